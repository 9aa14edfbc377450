//! Load shedding: at most N calls of the ingest service at once. A call beyond that is
//! answered at once with RESOURCE_EXHAUSTED and a RetryInfo detail, before it touches the
//! database, instead of queueing without bound.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

use super::{Hook, map_body};
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
        map_body(response, |body| WithPermit {
            body,
            _permit: permit,
        })
    }
}

/// A response body that holds its call's permit until it is done (or dropped).
struct WithPermit {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for WithPermit {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
