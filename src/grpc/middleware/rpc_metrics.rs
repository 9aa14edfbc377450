//! Counts every finished call by method and gRPC status code
//! (`krisp_rpc_requests_total`), when its status is known: at once for a trailers-only
//! answer, otherwise when the trailers go out (a stream counts when it ends).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Frame, SizeHint};
use tonic::body::Body;

use super::{Hook, map_body};
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
        map_body(response, |body| CountedBody {
            body,
            method: Some(method),
        })
    }
}

fn count(method: &str, code: &str) {
    let name = code
        .parse::<i32>()
        .map(|c| format!("{:?}", tonic::Code::from(c)))
        .unwrap_or_else(|_| code.to_owned());
    metrics::counter!(RPC_REQUESTS, "method" => method.to_owned(), "code" => name).increment(1);
}

/// A response body that counts its call when the trailers (with the status) go out.
struct CountedBody {
    body: Body,
    method: Option<String>,
}

impl http_body::Body for CountedBody {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(method) = self.method.take()
        {
            let code = trailers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0");
            count(&method, code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
