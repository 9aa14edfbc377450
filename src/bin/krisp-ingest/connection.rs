//! What the command-line clients share: the connection to a server (TLS, mutual TLS,
//! API key) and the simulated sentiments they send.

use chrono::{TimeDelta, Utc};
pub(crate) use krisp_ingest_client::Client;

use crate::cli::ClientArgs;
use krisp_ingest::proto::{self, to_timestamp};

/// A client of the server `args` name (the client crate's: TLS, mutual TLS, API key).
pub(crate) async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let options = krisp_ingest_client::Options {
        server: args.server.clone(),
        ca_file: args.ca_file.clone(),
        cert_file: args.cert_file.clone(),
        key_file: args.key_file.clone(),
        api_key: args.api_key.as_ref().map(|key| key.expose().to_owned()),
    };
    Ok(krisp_ingest_client::connect(&options).await?)
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
