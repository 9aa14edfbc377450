//! The framing of client streams: header, batches (items named by their index in the
//! whole stream), trailer.

use super::scalars::uuid;
use super::{Violated, violations_under};
use crate::domain::{Frame, StreamHeader};
use crate::error::{Error, Violations};
use crate::proto;

pub fn stream_header(header: &proto::StreamHeader) -> Violated<StreamHeader> {
    let mut v = Violations::new();
    let stream_id = v.check("header.stream_id", uuid(&header.stream_id));
    let participation_id = v.check("header.participation_id", uuid(&header.participation_id));
    let header = stream_id
        .zip(participation_id)
        .map(|(stream_id, participation_id)| StreamHeader {
            stream_id,
            participation_id,
        });
    v.finish(header)
}

/// Converts the items of one batch; `first_index` is the stream-wide index of the first
/// item, so that violations name the item's position in the whole stream.
pub fn batch<P, T>(
    items: Vec<P>,
    first_index: u64,
    field: &str,
    convert: impl Fn(P) -> Violated<T>,
) -> Result<Vec<T>, Error> {
    if items.is_empty() {
        return Err(Error::invalid(
            format!("batch.{field}"),
            "a batch must carry at least one item",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (offset, item) in (first_index..).zip(items) {
        match convert(item) {
            Ok(value) => out.push(value),
            Err(violations) => {
                return Err(violations_under(&format!("{field}[{offset}]"), violations));
            }
        }
    }
    Ok(out)
}

/// Turns a frame's oneof into a domain frame; `seen` counts the items before it.
pub fn frame<B, P, T>(
    frame: Option<StreamFrame<B>>,
    seen: &mut u64,
    field: &str,
    items: impl FnOnce(B) -> Vec<P>,
    convert: impl Fn(P) -> Violated<T>,
) -> Result<Frame<T>, Error> {
    match frame {
        None => Err(Error::invalid(
            "frame",
            "each stream message must set one of header, batch or trailer",
        )),
        Some(StreamFrame::Header(header)) => Ok(Frame::Header(stream_header(&header)?)),
        Some(StreamFrame::Trailer(trailer)) => Ok(Frame::Trailer {
            item_count: trailer.item_count,
        }),
        Some(StreamFrame::Batch(b)) => {
            let converted = batch(items(b), *seen, field, convert)?;
            *seen += converted.len() as u64;
            Ok(Frame::Batch(converted))
        }
    }
}

/// The oneof of a stream message, common to both stream kinds.
pub enum StreamFrame<B> {
    Header(proto::StreamHeader),
    Batch(B),
    Trailer(proto::StreamTrailer),
}

impl From<proto::stream_sentiments_request::Frame> for StreamFrame<proto::SentimentBatch> {
    fn from(frame: proto::stream_sentiments_request::Frame) -> Self {
        use proto::stream_sentiments_request::Frame as F;
        match frame {
            F::Header(h) => Self::Header(h),
            F::Batch(b) => Self::Batch(b),
            F::Trailer(t) => Self::Trailer(t),
        }
    }
}

impl From<proto::stream_events_request::Frame> for StreamFrame<proto::EventBatch> {
    fn from(frame: proto::stream_events_request::Frame) -> Self {
        use proto::stream_events_request::Frame as F;
        match frame {
            F::Header(h) => Self::Header(h),
            F::Batch(b) => Self::Batch(b),
            F::Trailer(t) => Self::Trailer(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::convert::new_sentiment;

    #[test]
    fn batch_violations_carry_the_stream_index() {
        let items = vec![
            proto::NewSentiment {
                started_at: Some(prost_types::Timestamp {
                    seconds: 10,
                    nanos: 0,
                }),
                ended_at: Some(prost_types::Timestamp {
                    seconds: 11,
                    nanos: 0,
                }),
                label: 1,
                score: None,
            },
            proto::NewSentiment::default(),
        ];
        let err = batch(items, 40, "sentiments", |s| new_sentiment(&s));
        let Err(Error::InvalidArgument(violations)) = err else {
            panic!("expected invalid argument");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "sentiments[41].started_at",
                "sentiments[41].ended_at",
                "sentiments[41].label"
            ]
        );
    }
}
