//! A client of a krisp-ingest server: plaintext, TLS (the CA of the server's certificate)
//! or mutual TLS (a client certificate and key), with an API key sent on every call as
//! `authorization: Bearer <key>`.

use std::path::{Path, PathBuf};

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::proto::ingest_service_client::IngestServiceClient;

/// The client every helper here takes.
pub type Client = IngestServiceClient<InterceptedService<Channel, ApiKey>>;

/// Where the server is and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The server's URL, e.g. `http://127.0.0.1:50051`; with a CA file an `http://` URL
    /// is called over `https://`.
    pub server: String,
    /// PEM file of the CA that signed the server's certificate; unset: plaintext.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM files), for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Sent with every call.
    pub api_key: Option<String>,
}

impl Options {
    /// Plaintext to `server`, no key.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            ..Self::default()
        }
    }
}

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0:?} is not a server URL")]
    Url(String, #[source] tonic::transport::Error),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("mutual TLS needs both a certificate and its key")]
    HalfIdentity,
    #[error("the TLS settings")]
    Tls(#[source] tonic::transport::Error),
    #[error("the API key has characters that cannot go in metadata")]
    Key,
    #[error("cannot reach krisp-ingest at {0}; is it running?")]
    Unreachable(String, #[source] tonic::transport::Error),
}

/// Adds the API key, when there is one, to every call.
#[derive(Debug, Clone, Default)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl ApiKey {
    pub fn new(key: Option<&str>) -> Result<Self, ConnectError> {
        key.map(|key| {
            format!("Bearer {key}")
                .parse()
                .map_err(|_| ConnectError::Key)
        })
        .transpose()
        .map(Self)
    }
}

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

/// Connects to the server `options` name.
pub async fn connect(options: &Options) -> Result<Client, ConnectError> {
    let key = ApiKey::new(options.api_key.as_deref())?;
    let server = match (&options.ca_file, options.server.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => options.server.clone(),
    };
    let mut endpoint =
        Endpoint::from_shared(server.clone()).map_err(|e| ConnectError::Url(server, e))?;
    if let Some(ca_file) = &options.ca_file {
        endpoint = endpoint
            .tls_config(tls_config(ca_file, options)?)
            .map_err(ConnectError::Tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| ConnectError::Unreachable(options.server.clone(), e))?;
    Ok(IngestServiceClient::with_interceptor(channel, key))
}

/// A client over a channel made elsewhere, with an API key when given.
pub fn with_channel(channel: Channel, api_key: Option<&str>) -> Result<Client, ConnectError> {
    Ok(IngestServiceClient::with_interceptor(
        channel,
        ApiKey::new(api_key)?,
    ))
}

fn tls_config(ca_file: &Path, options: &Options) -> Result<ClientTlsConfig, ConnectError> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| ConnectError::Read(path.into(), e));
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_file)?));
    match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => return Err(ConnectError::HalfIdentity),
    }
    Ok(config)
}
