//! Counts every finished call by method and gRPC status code
//! (`krisp_rpc_requests_total`), when its status is known: at once for a trailers-only
//! answer, otherwise when the trailers go out (a stream counts when it ends).

use http_body::Frame;
use hyper::body::Bytes;
use tonic::body::Body;

use super::{Hook, Watcher, watched};
use crate::metrics::RPC_REQUESTS;

#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetrics;

impl Hook for RpcMetrics {
    /// The method (the request path).
    type Carry = String;

    fn before<B>(&self, request: &http::Request<B>) -> Result<String, Box<tonic::Status>> {
        Ok(request.uri().path().to_owned())
    }

    fn after(&self, method: String, response: http::Response<Body>) -> http::Response<Body> {
        // A trailers-only answer (most errors) has its status in the headers.
        let early = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(code) = &early {
            count(&method, code);
            return response;
        }
        watched(
            response,
            CountAtTrailers {
                method: Some(method),
            },
        )
    }
}

fn count(method: &str, code: &str) {
    let name = code
        .parse::<i32>()
        .map(|c| format!("{:?}", tonic::Code::from(c)))
        .unwrap_or_else(|_| code.to_owned());
    metrics::counter!(RPC_REQUESTS, "method" => method.to_owned(), "code" => name).increment(1);
}

/// Counts its call when the trailers (with the status) go out.
struct CountAtTrailers {
    method: Option<String>,
}

impl Watcher for CountAtTrailers {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(trailers) = frame.trailers_ref()
            && let Some(method) = self.method.take()
        {
            let code = trailers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0");
            count(&method, code);
        }
    }
}
