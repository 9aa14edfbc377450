//! Every call in the metrics, named and labelled as go-grpc-prometheus does, so that the
//! dashboards and alerts written for it fit (`grpc_type`, `grpc_service`, `grpc_method`,
//! `grpc_code`):
//!
//! - `grpc_server_started_total`: calls started;
//! - `grpc_server_handled_total`: calls finished, by status code;
//! - `grpc_server_handling_seconds`: from the request to the status (a stream's whole
//!   life), a histogram;
//! - `grpc_server_msg_received_total` / `grpc_server_msg_sent_total`: messages read from
//!   and written to the calls (counted on the wire, in gRPC's length-prefixed framing).
//!
//! And, kept for the dashboards that use it, `krisp_rpc_requests_total{method, code}`.
//! A call is counted finished at once for a trailers-only answer (most errors),
//! otherwise when its trailers go out.

use std::{
    collections::HashMap,
    sync::OnceLock,
    task::{Context, Poll},
    time::Instant,
};

use http_body::Frame;
use hyper::body::Bytes;
use metrics::Counter;
use prost::Message as _;
use tonic::body::Body;
use tower::{Layer, Service};

use super::{Hook, Watcher, watch, watched};
use crate::metrics::{
    GRPC_HANDLED, GRPC_HANDLING_SECONDS, GRPC_MSG_RECEIVED, GRPC_MSG_SENT, GRPC_STARTED,
    RPC_REQUESTS,
};

/// The labels of one call.
#[derive(Debug, Clone)]
pub struct CallLabels {
    path: String,
    service: String,
    method: String,
    kind: &'static str,
}

impl CallLabels {
    fn of(path: &str) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", path));
        let kind = method_types().get(path).copied().unwrap_or("unknown");
        Self {
            path: path.to_owned(),
            service: service.to_owned(),
            method: method.to_owned(),
            kind,
        }
    }

    fn labels(&self) -> [(&'static str, String); 3] {
        [
            ("grpc_type", self.kind.to_owned()),
            ("grpc_service", self.service.clone()),
            ("grpc_method", self.method.clone()),
        ]
    }

    fn counter(&self, name: &'static str) -> Counter {
        metrics::counter!(name, &self.labels())
    }
}

/// `unary`, `client_stream`, `server_stream` or `bidi_stream` of every method served, from
/// the services' own descriptor sets.
fn method_types() -> &'static HashMap<String, &'static str> {
    static TYPES: OnceLock<HashMap<String, &'static str>> = OnceLock::new();
    TYPES.get_or_init(|| {
        let sets = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut types = HashMap::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        let path =
                            format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        types.insert(path, kind);
                    }
                }
            }
        }
        types
    })
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetrics;

/// What the hook keeps from the request: the call's labels and when it started.
pub struct Started {
    labels: CallLabels,
    at: Instant,
}

impl Hook for RpcMetrics {
    type Carry = Started;

    fn before<B>(&self, request: &http::Request<B>) -> Result<Started, Box<tonic::Status>> {
        let labels = CallLabels::of(request.uri().path());
        labels.counter(GRPC_STARTED).increment(1);
        Ok(Started {
            labels,
            at: Instant::now(),
        })
    }

    fn after(&self, started: Started, response: http::Response<Body>) -> http::Response<Body> {
        // A trailers-only answer (most errors) has its status in the headers.
        let early = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(code) = &early {
            handled(&started, code);
            return response;
        }
        let sent = started.labels.counter(GRPC_MSG_SENT);
        watched(
            response,
            AtTrailers {
                started: Some(started),
                framing: Framing::default(),
                sent,
            },
        )
    }
}

fn handled(started: &Started, status: &str) {
    let (code, debug_name) = match status.parse::<i32>().map(tonic::Code::from) {
        Ok(code) => (code_name(code), format!("{code:?}")),
        Err(_) => (status.to_owned(), status.to_owned()),
    };
    let labels = &started.labels;
    let mut with_code = labels.labels().to_vec();
    with_code.push(("grpc_code", code));
    metrics::counter!(GRPC_HANDLED, &with_code).increment(1);
    metrics::histogram!(GRPC_HANDLING_SECONDS, &labels.labels())
        .record(started.at.elapsed().as_secs_f64());
    metrics::counter!(RPC_REQUESTS, "method" => labels.path.clone(), "code" => debug_name)
        .increment(1);
}

/// A code as go-grpc-prometheus names it (Go's `codes.Code.String()`).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Counts the messages going out, and the call when the trailers (with the status) go.
struct AtTrailers {
    started: Option<Started>,
    framing: Framing,
    sent: Counter,
}

impl Watcher for AtTrailers {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.sent.increment(self.framing.messages_in(data));
        }
        if let Some(trailers) = frame.trailers_ref()
            && let Some(started) = self.started.take()
        {
            let code = trailers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0");
            handled(&started, code);
        }
    }
}

/// Where a byte stream of gRPC messages (each a 5-byte prefix, flag and big-endian
/// length, then the message) is, across however its frames split it.
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; 5],
    prefix_read: usize,
    message_left: u64,
}

impl Framing {
    /// The messages whose prefix ends in `data`.
    fn messages_in(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.message_left > 0 {
                let skip = usize::try_from(self.message_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.message_left -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.prefix_read).min(data.len());
            self.prefix[self.prefix_read..self.prefix_read + take].copy_from_slice(&data[..take]);
            self.prefix_read += take;
            data = &data[take..];
            if self.prefix_read == 5 {
                self.prefix_read = 0;
                let [_, a, b, c, d] = self.prefix;
                self.message_left = u64::from(u32::from_be_bytes([a, b, c, d]));
                messages += 1;
            }
        }
        messages
    }
}

/// Counts the messages each call receives (`grpc_server_msg_received_total`) as its
/// request body is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReceivedMessagesLayer;

impl<S> Layer<S> for ReceivedMessagesLayer {
    type Service = ReceivedMessages<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReceivedMessages { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ReceivedMessages<S> {
    inner: S,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for ReceivedMessages<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for ReceivedMessages<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let received = CallLabels::of(request.uri().path()).counter(GRPC_MSG_RECEIVED);
        self.inner.call(request.map(|body| {
            watch(
                body,
                CountReceived {
                    framing: Framing::default(),
                    received,
                },
            )
        }))
    }
}

/// Counts the messages of a request body as it is read.
struct CountReceived {
    framing: Framing,
    received: Counter,
}

impl Watcher for CountReceived {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.received.increment(self.framing.messages_in(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_counted_however_frames_split_them() {
        let message = |len: u32| {
            let mut bytes = vec![0];
            bytes.extend(len.to_be_bytes());
            bytes.extend(std::iter::repeat_n(7, len as usize));
            bytes
        };
        let stream: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        for split in [1, 2, 4, 5, 6, 64, stream.len()] {
            let mut framing = Framing::default();
            let counted: u64 = stream.chunks(split).map(|c| framing.messages_in(c)).sum();
            assert_eq!(counted, 4, "frames of {split} bytes");
        }
    }

    #[test]
    fn every_method_has_its_type() {
        let types = method_types();
        assert_eq!(types["/krisp.ingest.v1.IngestService/CreateUser"], "unary");
        assert_eq!(
            types["/krisp.ingest.v1.IngestService/StreamSentiments"],
            "client_stream"
        );
        assert_eq!(
            types["/krisp.ingest.v1.IngestService/GetTimeline"],
            "server_stream"
        );
        assert_eq!(
            types["/krisp.ingest.v1.IngestService/LiveFeed"],
            "bidi_stream"
        );
        assert_eq!(types["/grpc.health.v1.Health/Check"], "unary");
        assert_eq!(
            types["/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"],
            "bidi_stream"
        );
    }
}
