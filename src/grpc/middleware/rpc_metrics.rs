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
//!
//! The labels of every served method are made once, from the services' own descriptor
//! sets; a path that no service serves is counted under `unknown`, so that what a client
//! writes in its request line never becomes a series of its own.

use std::{
    collections::HashMap,
    sync::OnceLock,
    task::{Context, Poll},
    time::Instant,
};

use http_body::Frame;
use hyper::body::Bytes;
use metrics::{Counter, Histogram, Key, Label, Level, Metadata};
use prost::Message as _;
use tonic::body::Body;
use tower::{Layer, Service};

use super::{Hook, Watcher, watch, watched};
use crate::metrics::{
    GRPC_HANDLED, GRPC_HANDLING_SECONDS, GRPC_MSG_RECEIVED, GRPC_MSG_SENT, GRPC_STARTED,
    RPC_REQUESTS,
};

/// gRPC's status codes, 0 to 16.
const CODES: usize = 17;

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The labels of one served method (or of every path no service serves), made once:
/// a call builds no label of its own.
#[derive(Debug)]
struct CallLabels {
    /// `grpc_type`, `grpc_service`, `grpc_method`.
    grpc: &'static [Label],
    /// Those and `grpc_code`, by code.
    handled: Vec<&'static [Label]>,
    /// `krisp_rpc_requests_total`'s `method` (the path) and `code` (tonic's name), by code.
    requests: Vec<&'static [Label]>,
}

impl CallLabels {
    fn new(kind: &str, service: &str, method: &str, path: &str) -> Self {
        let grpc = vec![
            Label::new("grpc_type", kind.to_owned()),
            Label::new("grpc_service", service.to_owned()),
            Label::new("grpc_method", method.to_owned()),
        ];
        let codes = (0..CODES).filter_map(|n| i32::try_from(n).ok().map(tonic::Code::from));
        let handled = codes
            .clone()
            .map(|code| {
                let mut labels = grpc.clone();
                labels.push(Label::new("grpc_code", code_name(code)));
                leak(labels)
            })
            .collect();
        let requests = codes
            .map(|code| {
                leak(vec![
                    Label::new("method", path.to_owned()),
                    Label::new("code", format!("{code:?}")),
                ])
            })
            .collect();
        Self {
            grpc: leak(grpc),
            handled,
            requests,
        }
    }

    /// The labels of the method `path` names.
    fn of(path: &str) -> &'static Self {
        static UNKNOWN: OnceLock<CallLabels> = OnceLock::new();
        served().get(path).unwrap_or_else(|| {
            UNKNOWN.get_or_init(|| Self::new("unknown", "unknown", "unknown", "unknown"))
        })
    }

    fn counter(&self, name: &'static str) -> Counter {
        counter(name, self.grpc)
    }
}

/// Labels live as long as the process: a handful of methods, made once.
fn leak(labels: Vec<Label>) -> &'static [Label] {
    Box::leak(labels.into_boxed_slice())
}

fn counter(name: &'static str, labels: &'static [Label]) -> Counter {
    let key = Key::from_static_parts(name, labels);
    metrics::with_recorder(|recorder| recorder.register_counter(&key, &METADATA))
}

fn histogram(name: &'static str, labels: &'static [Label]) -> Histogram {
    let key = Key::from_static_parts(name, labels);
    metrics::with_recorder(|recorder| recorder.register_histogram(&key, &METADATA))
}

/// The labels of every method served, by path, from the services' own descriptor sets
/// (`grpc_type` is `unary`, `client_stream`, `server_stream` or `bidi_stream`).
fn served() -> &'static HashMap<String, CallLabels> {
    static SERVED: OnceLock<HashMap<String, CallLabels>> = OnceLock::new();
    SERVED.get_or_init(|| {
        let sets = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut served = HashMap::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                for service in &file.service {
                    let service_name = format!("{}.{}", file.package(), service.name());
                    for method in &service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        let path = format!("/{service_name}/{}", method.name());
                        let labels = CallLabels::new(kind, &service_name, method.name(), &path);
                        served.insert(path, labels);
                    }
                }
            }
        }
        served
    })
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetrics;

/// What the hook keeps from the request: the call's labels and when it started.
pub struct Started {
    labels: &'static CallLabels,
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
            .map(|v| status_code(v.as_bytes()));
        if let Some(code) = early {
            handled(&started, code);
            return response;
        }
        let sent = CountMessages::new(started.labels.counter(GRPC_MSG_SENT));
        watched(
            response,
            AtTrailers {
                started: Some(started),
                sent,
            },
        )
    }
}

/// The code of a `grpc-status` value; one that is no code is Unknown, as tonic reads it.
fn status_code(value: &[u8]) -> tonic::Code {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Unknown, tonic::Code::from)
}

fn handled(started: &Started, code: tonic::Code) {
    let labels = started.labels;
    let n = usize::try_from(code as i32).unwrap_or(0).min(CODES - 1);
    counter(GRPC_HANDLED, labels.handled[n]).increment(1);
    histogram(GRPC_HANDLING_SECONDS, labels.grpc).record(started.at.elapsed().as_secs_f64());
    counter(RPC_REQUESTS, labels.requests[n]).increment(1);
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
    sent: CountMessages,
}

impl Watcher for AtTrailers {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        self.sent.frame(frame);
        if let Some(trailers) = frame.trailers_ref()
            && let Some(started) = self.started.take()
        {
            let code = trailers
                .get("grpc-status")
                .map_or(tonic::Code::Ok, |v| status_code(v.as_bytes()));
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
        let received =
            CountMessages::new(CallLabels::of(request.uri().path()).counter(GRPC_MSG_RECEIVED));
        self.inner.call(request.map(|body| watch(body, received)))
    }
}

/// Counts the gRPC messages of a body (a request's or a response's) in `counter` as its
/// frames pass.
struct CountMessages {
    framing: Framing,
    counter: Counter,
}

impl CountMessages {
    fn new(counter: Counter) -> Self {
        Self {
            framing: Framing::default(),
            counter,
        }
    }
}

impl Watcher for CountMessages {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.counter.increment(self.framing.messages_in(data));
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

    /// The value of `name` among `labels`.
    fn label(labels: &[Label], name: &str) -> String {
        labels
            .iter()
            .find(|l| l.key() == name)
            .map(|l| l.value().to_owned())
            .unwrap_or_default()
    }

    #[test]
    fn every_method_has_its_type() {
        let kind = |path: &str| label(CallLabels::of(path).grpc, "grpc_type");
        assert_eq!(kind("/krisp.ingest.v1.IngestService/CreateUser"), "unary");
        assert_eq!(
            kind("/krisp.ingest.v1.IngestService/StreamSentiments"),
            "client_stream"
        );
        assert_eq!(
            kind("/krisp.ingest.v1.IngestService/GetTimeline"),
            "server_stream"
        );
        assert_eq!(
            kind("/krisp.ingest.v1.IngestService/LiveFeed"),
            "bidi_stream"
        );
        assert_eq!(kind("/grpc.health.v1.Health/Check"), "unary");
        assert_eq!(
            kind("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "bidi_stream"
        );
    }

    #[test]
    fn a_path_no_service_serves_is_unknown_whatever_it_says() {
        for path in ["/krisp.ingest.v1.IngestService/Nope", "/x", "/a/b/c", ""] {
            let labels = CallLabels::of(path);
            for name in ["grpc_type", "grpc_service", "grpc_method"] {
                assert_eq!(label(labels.grpc, name), "unknown", "{path:?}");
            }
            assert_eq!(label(labels.requests[0], "method"), "unknown", "{path:?}");
        }
        let create = CallLabels::of("/krisp.ingest.v1.IngestService/CreateUser");
        assert_eq!(
            label(create.grpc, "grpc_service"),
            "krisp.ingest.v1.IngestService"
        );
        assert_eq!(label(create.grpc, "grpc_method"), "CreateUser");
        assert_eq!(label(create.handled[0], "grpc_code"), "OK");
        assert_eq!(label(create.handled[5], "grpc_code"), "NotFound");
        assert_eq!(label(create.requests[5], "code"), "NotFound");
        assert_eq!(
            label(create.requests[0], "method"),
            "/krisp.ingest.v1.IngestService/CreateUser"
        );
    }

    #[test]
    fn a_status_that_is_no_code_is_unknown() {
        assert_eq!(status_code(b"5"), tonic::Code::NotFound);
        assert_eq!(status_code(b"99"), tonic::Code::Unknown);
        assert_eq!(status_code(b"x"), tonic::Code::Unknown);
    }
}
