//! A request id for every call: taken from the `x-request-id` metadata when the client
//! sends a usable one, generated otherwise; recorded on a span that wraps the whole call
//! (so every log line of the call carries it) and echoed in the response metadata. With
//! traces on, the span is the call's server span and continues the W3C `traceparent`
//! the client sent ([`crate::telemetry`]). The call also runs inside its deadline's
//! [`crate::deadline::scope`], read from `grpc-timeout`, so that storage can pass the
//! deadline on to PostgreSQL.

use futures_util::future::BoxFuture;
use http::HeaderValue;
use tonic::body::Body;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

use super::Hook;

pub const HEADER: &str = "x-request-id";

/// A client's id is used when it is 1 to 128 visible ASCII characters.
fn usable(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let fits = (1..=128).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic());
    fits.then(|| text.to_owned())
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestId;

/// A request's headers as OpenTelemetry's propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// What a call carries: its id, its span, its deadline.
pub struct Call {
    id: String,
    span: tracing::Span,
    deadline: Option<tokio::time::Instant>,
}

impl Hook for RequestId {
    type Carry = Call;

    fn before<B>(&self, request: &http::Request<B>) -> Result<Call, Box<tonic::Status>> {
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
        let path = request.uri().path();
        let span = tracing::info_span!(
            "rpc",
            request_id = %id,
            method = %path,
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty,
        );
        if crate::telemetry::traces_on() {
            // The parent first: an OpenTelemetry span takes it only until it starts.
            let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.extract(&Headers(request.headers()))
            });
            // Without a traceparent the call starts a trace of its own.
            let _ = span.set_parent(parent);
            // Recorded only for traces: the logs show the request id and the method.
            let name = path.trim_start_matches('/');
            span.record("otel.name", name);
            span.record("otel.kind", "server");
            span.set_attribute("rpc.system", "grpc");
            if let Some((service, method)) = name.split_once('/') {
                span.set_attribute("rpc.service", service.to_owned());
                span.set_attribute("rpc.method", method.to_owned());
            }
        }
        Ok(Call { id, span, deadline })
    }

    fn span(&self, call: &Call) -> Option<tracing::Span> {
        Some(call.span.clone())
    }

    fn after(&self, call: Call, mut response: http::Response<Body>) -> http::Response<Body> {
        if let Ok(value) = HeaderValue::from_str(&call.id) {
            response.headers_mut().insert(HEADER, value);
        }
        response
    }

    fn around<T: 'static, C>(&self, call: Call, run: C) -> BoxFuture<'static, T>
    where
        C: FnOnce(Call) -> BoxFuture<'static, T>,
    {
        let (span, deadline) = (call.span.clone(), call.deadline);
        Box::pin(crate::deadline::scope(deadline, run(call)).instrument(span))
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
