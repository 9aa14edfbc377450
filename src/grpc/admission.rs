//! Load shedding: at most N calls of the ingest service at once. A call beyond that is
//! answered at once with RESOURCE_EXHAUSTED and a RetryInfo detail, before it touches the
//! database, instead of queueing without bound.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body, server::NamedService};
use tower::{Layer, Service};

use crate::error::Error;

/// How long a shed client is told to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
}

impl AdmissionLayer {
    pub fn new(max_concurrent_calls: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent_calls)),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            permits: Arc::clone(&self.permits),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                let call = self.inner.call(request);
                // The permit lives as long as the response body: a server stream
                // (GetTimeline) counts until its last message, not until its handler returns.
                Box::pin(async move {
                    let response = call.await?;
                    Ok(response.map(|body| {
                        Body::new(WithPermit {
                            body,
                            _permit: permit,
                        })
                    }))
                })
            }
            Err(_) => {
                metrics::counter!(crate::metrics::LOAD_SHED).increment(1);
                let status = Status::from(Error::ResourceExhausted {
                    message: "the server is at its limit of concurrent calls; retry after the \
                              delay in RetryInfo"
                        .to_owned(),
                    retry_after: Some(RETRY_AFTER),
                });
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
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
