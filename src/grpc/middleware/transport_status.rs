//! tonic answers some requests before any handler runs, with codes that tell a client
//! the wrong thing: a request that does not decode (say, invalid UTF-8 in a string) gets
//! INTERNAL, and one over the size limit OUT_OF_RANGE. This rewrites those two to
//! INVALID_ARGUMENT and RESOURCE_EXHAUSTED, keeping tonic's message.

use http::{HeaderValue, Response};

const DECODE_FAILURE: &str = "failed%20to%20decode%20Protobuf%20message";
const TOO_LARGE: &str = "message%20length%20too%20large";

fn message(response: &Response<impl Sized>) -> &str {
    response
        .headers()
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
}

pub fn rewrite<B>(mut response: Response<B>) -> Response<B> {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|c| c.to_str().ok());
    let replacement = match code {
        Some("13") if message(&response).contains(DECODE_FAILURE) => Some("3"),
        Some("11") if message(&response).contains(TOO_LARGE) => Some("8"),
        _ => None,
    };
    if let Some(code) = replacement {
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static(code));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(code: &str, message: &str) -> Response<()> {
        let mut response = Response::new(());
        let headers = response.headers_mut();
        headers.insert(
            "grpc-status",
            HeaderValue::from_str(code).unwrap_or(HeaderValue::from_static("0")),
        );
        headers.insert(
            "grpc-message",
            HeaderValue::from_str(message).unwrap_or(HeaderValue::from_static("")),
        );
        response
    }

    fn code(response: &Response<()>) -> &str {
        response
            .headers()
            .get("grpc-status")
            .and_then(|c| c.to_str().ok())
            .unwrap_or("")
    }

    #[test]
    fn decode_failures_become_invalid_argument() {
        let r = rewrite(response(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20string",
        ));
        assert_eq!(code(&r), "3");
        // Other internal errors stay internal.
        assert_eq!(code(&rewrite(response("13", "internal%20error"))), "13");
    }

    #[test]
    fn oversized_messages_become_resource_exhausted() {
        let r = rewrite(response(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%205%20bytes",
        ));
        assert_eq!(code(&r), "8");
        assert_eq!(code(&rewrite(response("11", "other"))), "11");
    }
}
