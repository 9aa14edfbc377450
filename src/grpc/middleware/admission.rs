//! Load shedding: at most N unary and server-streaming calls of the ingest service at
//! once, and apart from them at most M open client streams (which wait on their clients,
//! not on the database, and cost a spool each). A call beyond its limit is answered at
//! once with RESOURCE_EXHAUSTED and a RetryInfo detail, before it touches the database,
//! instead of queueing without bound.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

use super::{Hook, Watcher, watched};
use crate::error::Error;

/// How long a shed client is told to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The methods that stream from the client (feeds): counted apart from the other calls.
const CLIENT_STREAMS: [&str; 3] = [
    "/krisp.ingest.v1.IngestService/StreamSentiments",
    "/krisp.ingest.v1.IngestService/StreamEvents",
    "/krisp.ingest.v1.IngestService/LiveFeed",
];

/// At most a number of calls, and of client streams, at once; the rest are shed.
#[derive(Debug, Clone)]
pub struct Admission {
    calls: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

impl Admission {
    pub fn new(max_concurrent_calls: usize, max_open_streams: usize) -> Self {
        Self {
            calls: Arc::new(Semaphore::new(max_concurrent_calls)),
            streams: Arc::new(Semaphore::new(max_open_streams)),
        }
    }
}

impl Hook for Admission {
    type Carry = OwnedSemaphorePermit;

    fn before<B>(&self, request: &http::Request<B>) -> Result<Self::Carry, Box<Status>> {
        let (permits, what) = if CLIENT_STREAMS.contains(&request.uri().path()) {
            (&self.streams, "open client streams")
        } else {
            (&self.calls, "concurrent calls")
        };
        Arc::clone(permits).try_acquire_owned().map_err(|_| {
            metrics::counter!(crate::metrics::LOAD_SHED).increment(1);
            Box::new(Status::from(Error::ResourceExhausted {
                message: format!(
                    "the server is at its limit of {what}; retry after the delay in RetryInfo"
                ),
                retry_after: Some(RETRY_AFTER),
            }))
        })
    }

    /// The permit lives as long as the response body: a server stream (GetTimeline)
    /// counts until its last message, not until its handler returns.
    fn after(&self, permit: Self::Carry, response: http::Response<Body>) -> http::Response<Body> {
        watched(response, permit)
    }
}

impl Watcher for OwnedSemaphorePermit {}
