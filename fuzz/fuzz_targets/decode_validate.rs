//! Request decoding and validation on arbitrary bytes: the first byte picks the request
//! type, the rest is decoded as that protobuf message and converted as the server does.
//! Nothing may panic, and whatever is refused maps to INVALID_ARGUMENT.

#![no_main]

use krisp_ingest::{error::Error, grpc::convert, proto};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::{Code, Status};

fn refused(violations: Vec<krisp_ingest::error::FieldViolation>) {
    assert!(!violations.is_empty());
    let status = Status::from(Error::from(violations));
    assert_eq!(status.code(), Code::InvalidArgument);
}

fn check<T>(result: Result<T, Vec<krisp_ingest::error::FieldViolation>>) {
    if let Err(violations) = result {
        refused(violations);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 8 {
        0 => {
            if let Ok(m) = proto::CreateUserRequest::decode(bytes) {
                check(convert::new_user(m));
            }
        }
        1 => {
            if let Ok(m) = proto::UpsertTimezoneRequest::decode(bytes) {
                check(convert::timezone(m.timezone));
            }
        }
        2 => {
            if let Ok(m) = proto::CreateSessionRequest::decode(bytes) {
                check(convert::create_session(m));
            }
        }
        3 => {
            if let Ok(m) = proto::JoinSessionRequest::decode(bytes) {
                check(convert::join(m));
            }
        }
        4 => {
            if let Ok(m) = proto::LeaveSessionRequest::decode(bytes) {
                check(convert::leave(m));
            }
        }
        5 => {
            if let Ok(m) = proto::RecordSentimentRequest::decode(bytes) {
                match convert::record_sentiment(m) {
                    Ok(convert::RecordSentiment { sentiment, .. }) => {
                        assert!(sentiment.ended_at > sentiment.started_at);
                        assert!(sentiment.score.is_none_or(|s| (-1.0..=1.0).contains(&s)));
                    }
                    Err(violations) => refused(violations),
                }
            }
        }
        6 => {
            if let Ok(m) = proto::RecordEventRequest::decode(bytes) {
                check(convert::record_event(m));
            }
        }
        _ => {
            if let Ok(m) = proto::StreamSentimentsRequest::decode(bytes) {
                let mut seen = 0;
                let frame = convert::frame(
                    m.frame.map(convert::StreamFrame::from),
                    &mut seen,
                    "sentiments",
                    |b: proto::SentimentBatch| b.sentiments,
                    |s| convert::new_sentiment(&s),
                );
                if let Err(error) = frame {
                    assert_eq!(Status::from(error).code(), Code::InvalidArgument);
                }
            }
        }
    }
});
