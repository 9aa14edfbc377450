//! What the command-line clients share: the connection to a server (TLS, mutual TLS,
//! API key) and the simulated sentiments they send.

use anyhow::Context;
use chrono::{TimeDelta, Utc};
use tonic::transport::Channel;

use crate::cli::ClientArgs;
use krisp_ingest::proto::{self, ingest_service_client::IngestServiceClient, to_timestamp};

/// Adds the API key, when there is one, to every call.
#[derive(Clone)]
pub(crate) struct ApiKey(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for ApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub(crate) type Client =
    IngestServiceClient<tonic::service::interceptor::InterceptedService<Channel, ApiKey>>;

pub(crate) async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let key = args
        .api_key
        .as_ref()
        .map(|key| format!("Bearer {}", key.expose()).parse())
        .transpose()
        .context("the API key has characters that cannot go in metadata")?;
    // With a CA file the call goes over TLS: an http:// URL is called over https://.
    let server = match (&args.ca_file, args.server.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => args.server.clone(),
    };
    let mut endpoint = Channel::from_shared(server.clone())
        .with_context(|| format!("{server:?} is not a server URL"))?;
    if let Some(ca_file) = &args.ca_file {
        endpoint = endpoint
            .tls_config(tls_config(ca_file, args)?)
            .context("the TLS settings")?;
    }
    let channel = endpoint.connect().await.with_context(|| {
        format!(
            "cannot reach krisp-ingest at {}; is it running?",
            args.server
        )
    })?;
    Ok(IngestServiceClient::with_interceptor(channel, ApiKey(key)))
}

/// TLS to the server: its CA, and a client certificate when given (mutual TLS).
fn tls_config(
    ca_file: &std::path::Path,
    args: &ClientArgs,
) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca_file)?));
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        config = config.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(config)
}

/// The `i`-th simulated sentiment: 100 ms segments, back to back, from `connected`.
pub(crate) fn sentiment(connected: chrono::DateTime<Utc>, i: u64) -> proto::NewSentiment {
    let labels = [
        proto::SentimentLabel::Positive,
        proto::SentimentLabel::Neutral,
        proto::SentimentLabel::Negative,
    ];
    let ms = i64::try_from(i).unwrap_or(i64::MAX / 200) * 100;
    let at = |offset_ms: i64| to_timestamp(connected + TimeDelta::milliseconds(ms + offset_ms));
    proto::NewSentiment {
        started_at: Some(at(0)),
        ended_at: Some(at(100)),
        label: labels[(i % 3) as usize] as i32,
        score: Some(((i % 200) as f64 / 100.0) - 1.0),
    }
}
