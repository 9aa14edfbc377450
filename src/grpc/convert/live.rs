//! The messages of a live feed (LiveFeed): protobuf -> domain, items named by their
//! sequence number (`items[43].ended_at`); replies domain -> protobuf.

use super::scalars::uuid;
use super::{new_event, new_sentiment, violations_under};
use crate::domain::{FeedEntry, FeedMessage, FeedReply, Violations};
use crate::error::{Error, FieldViolation};
use crate::proto::{
    self, feed_item::Item, live_feed_request::Frame, live_feed_response::Frame as Reply,
    to_timestamp,
};

pub fn feed_message(message: proto::LiveFeedRequest) -> Result<FeedMessage, Error> {
    match message.frame {
        None => Err(Error::invalid(
            "frame",
            "each LiveFeed message must set one of open, append or close",
        )),
        Some(Frame::Open(open)) => {
            let mut v = Violations::new();
            let feed_id = v.check("open.feed_id", uuid(&open.feed_id));
            let participation_id = v.check("open.participation_id", uuid(&open.participation_id));
            let open = feed_id
                .zip(participation_id)
                .map(|(feed_id, participation_id)| FeedMessage::Open {
                    feed_id,
                    participation_id,
                });
            Ok(v.finish(open)?)
        }
        Some(Frame::Append(append)) => {
            let bytes = prost::Message::encoded_len(&append);
            if append.first_seq == 0 {
                return Err(Error::invalid(
                    "append.first_seq",
                    "sequence numbers start at 1",
                ));
            }
            if append.items.is_empty() {
                return Err(Error::invalid(
                    "append.items",
                    "an append must carry at least one item",
                ));
            }
            let mut items = Vec::with_capacity(append.items.len());
            for (seq, item) in (append.first_seq..).zip(append.items) {
                let entry = match item.item {
                    Some(Item::Sentiment(s)) => new_sentiment(&s).map(FeedEntry::Sentiment),
                    Some(Item::Event(e)) => new_event(e).map(FeedEntry::Event),
                    None => Err(vec![FieldViolation::new(
                        "item",
                        "each item must set one of sentiment or event",
                    )]),
                };
                items.push(entry.map_err(|violations| {
                    violations_under(&format!("items[{seq}]"), violations)
                })?);
            }
            Ok(FeedMessage::Append {
                first_seq: append.first_seq,
                items,
                bytes,
            })
        }
        Some(Frame::Close(close)) => Ok(FeedMessage::Close {
            final_seq: close.final_seq,
        }),
    }
}

pub fn feed_reply_to_proto(reply: FeedReply) -> proto::LiveFeedResponse {
    let frame = match reply {
        FeedReply::Opened {
            committed_seq,
            closed,
        } => Reply::Opened(proto::FeedOpened {
            committed_seq,
            closed,
        }),
        FeedReply::Ack { committed_through } => Reply::Ack(proto::FeedAck { committed_through }),
        FeedReply::Closed(receipt) => Reply::Closed(proto::FeedClosed {
            feed_id: receipt.feed_id.to_string(),
            items_stored: receipt.items_stored,
            closed_at: Some(to_timestamp(receipt.closed_at)),
        }),
    };
    proto::LiveFeedResponse { frame: Some(frame) }
}
