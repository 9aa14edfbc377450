//! A request id for every call: taken from the `x-request-id` metadata when the client
//! sends a usable one, generated otherwise; recorded on a span that wraps the whole call
//! (so every log line of the call carries it) and echoed in the response metadata. The
//! call also runs inside its deadline's [`crate::deadline::scope`], read from
//! `grpc-timeout`, so that storage can pass the deadline on to PostgreSQL.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::HeaderValue;
use tower::{Layer, Service};
use tracing::Instrument;
use uuid::Uuid;

pub const HEADER: &str = "x-request-id";

/// A client's id is used when it is 1 to 128 visible ASCII characters.
fn usable(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let fits = (1..=128).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic());
    fits.then(|| text.to_owned())
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestId { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for RequestId<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let id = request
            .headers()
            .get(HEADER)
            .and_then(usable)
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(crate::deadline::parse_grpc_timeout)
            .and_then(|timeout| tokio::time::Instant::now().checked_add(timeout));
        let span = tracing::info_span!("rpc", request_id = %id, method = %request.uri().path());
        let call = self.inner.call(request);
        Box::pin(
            crate::deadline::scope(deadline, async move {
                let mut response = call.await?;
                if let Ok(value) = HeaderValue::from_str(&id) {
                    response.headers_mut().insert(HEADER, value);
                }
                Ok(response)
            })
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_are_taken_from_clients() {
        assert_eq!(
            usable(&HeaderValue::from_static("abc-123")),
            Some("abc-123".into())
        );
        assert_eq!(usable(&HeaderValue::from_static("has space")), None);
        assert_eq!(usable(&HeaderValue::from_static("")), None);
        let long = "x".repeat(129);
        assert_eq!(
            HeaderValue::from_str(&long).ok().and_then(|v| usable(&v)),
            None
        );
    }
}
