//! Load shedding: at most N calls of the ingest service at once. A call beyond that is
//! answered at once with RESOURCE_EXHAUSTED and a RetryInfo detail, before it touches the
//! database, instead of queueing without bound.

use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

use super::{Hook, Watcher, watched};
use crate::error::Error;

/// How long a shed client is told to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// At most a number of calls at once; the rest are shed.
#[derive(Debug, Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
}

impl Admission {
    pub fn new(max_concurrent_calls: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent_calls)),
        }
    }
}

impl Hook for Admission {
    type Carry = OwnedSemaphorePermit;

    fn before<B>(&self, _: &http::Request<B>) -> Result<Self::Carry, Box<Status>> {
        Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            metrics::counter!(crate::metrics::LOAD_SHED).increment(1);
            Box::new(Status::from(Error::ResourceExhausted {
                message: "the server is at its limit of concurrent calls; retry after the \
                          delay in RetryInfo"
                    .to_owned(),
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
