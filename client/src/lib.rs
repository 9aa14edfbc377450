//! The Rust client of krisp-ingest (package `krisp.ingest.v1`):
//!
//! - [`proto`]: the messages and `IngestServiceClient`, generated from `proto/`;
//! - [`connect`]: a client over plaintext, TLS or mutual TLS, with an API key on every call;
//! - [`field_violations`]: the field violations of an `INVALID_ARGUMENT` status;
//! - [`LiveFeed`]: a live feed that pipelines appends up to a window, keeps every item
//!   until it is acknowledged and resumes after any retryable error, so that each item is
//!   stored exactly once.
//!
//! ```ignore
//! let mut client = krisp_ingest_client::connect(&Options::new("http://127.0.0.1:50051")).await?;
//! let mut feed = LiveFeed::new(client.clone(), feed_id, participation_id, FeedOptions::default());
//! feed.append(items).await?;      // waits only while the window is full
//! let closed = feed.close().await?;
//! ```

mod connect;
mod errors;
mod live_feed;
mod time;

pub use connect::{ApiKey, Client, ConnectError, Options, connect, with_channel};
pub use errors::{FieldViolation, field_violations, retryable};
pub use live_feed::{FeedOptions, LiveFeed};

/// The contract: the messages and the client generated from `proto/`, and the
/// conversions of time between chrono and protobuf.
pub mod proto {
    pub use super::time::{to_duration, to_timestamp};
    pub use generated::*;

    #[allow(
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        missing_docs
    )]
    mod generated {
        tonic::include_proto!("krisp.ingest.v1");
    }
}
