//! GetTimeline both ways: the request's range and position, and the entries packed into
//! response messages.

use prost::Message as _;
use uuid::Uuid;

use super::Violated;
use super::enums::entry_kind;
use super::responses::{event_to_proto, sentiment_to_proto};
use super::scalars::{timestamp, uuid};
use crate::domain::{EntryKind, TimelineEntry, TimelinePosition, TimelineRange, Violations};
use crate::proto::{self, to_timestamp};

/// GetTimeline, parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GetTimeline {
    pub participation_id: Uuid,
    pub range: TimelineRange,
    pub chunked: bool,
}

/// The encoded bytes of entries a chunked message holds, about: a message is closed once
/// its entries reach this.
pub const CHUNK_BYTES: usize = 64 * 1024;

pub fn get_timeline(req: &proto::GetTimelineRequest) -> Violated<GetTimeline> {
    let mut v = Violations::new();
    let id = v.check("participation_id", uuid(&req.participation_id));
    let optional = |t: &Option<prost_types::Timestamp>| match t {
        Some(t) => timestamp(Some(t)).map(Some),
        None => Ok(None),
    };
    let from = v.check("start_time", optional(&req.start_time));
    let until = v.check("end_time", optional(&req.end_time));
    let range = match (from, until) {
        (Some(from), Some(until)) => v.check("end_time", TimelineRange::between(from, until)),
        _ => None,
    };
    let after = match &req.after {
        None => Some(None),
        Some(after) => {
            let at = v.check("after.time", timestamp(after.time.as_ref()));
            let kind = v.check("after.kind", entry_kind(after.kind));
            let id = v.check("after.id", uuid(&after.id));
            match (at, kind, id) {
                (Some(at), Some(kind), Some(id)) => Some(Some(TimelinePosition { at, kind, id })),
                _ => None,
            }
        }
    };
    let range = range.zip(after).map(|(range, after)| match after {
        Some(position) => range.after(position),
        None => range,
    });
    v.finish(id.zip(range).map(|(participation_id, range)| GetTimeline {
        participation_id,
        range,
        chunked: req.chunked,
    }))
}

pub fn timeline_entry_to_proto(entry: TimelineEntry) -> proto::TimelineEntry {
    use proto::timeline_entry::Entry;
    let entry = match entry {
        TimelineEntry::Sentiment(s) => Entry::Sentiment(sentiment_to_proto(s)),
        TimelineEntry::Event(e) => Entry::Event(event_to_proto(e)),
    };
    proto::TimelineEntry { entry: Some(entry) }
}

/// The position of an entry, as a client sends it back in `after`.
pub fn timeline_position_to_proto(position: TimelinePosition) -> proto::TimelinePosition {
    proto::TimelinePosition {
        time: Some(to_timestamp(position.at)),
        kind: match position.kind {
            EntryKind::Event => proto::TimelineEntryKind::Event,
            EntryKind::Sentiment => proto::TimelineEntryKind::Sentiment,
        } as i32,
        id: position.id.to_string(),
    }
}

/// The response messages of `entries`: one per entry, or, `chunked`, as many entries a
/// message as fit in about [`CHUNK_BYTES`] (at least one).
pub fn timeline_messages(
    entries: Vec<TimelineEntry>,
    chunked: bool,
) -> Vec<proto::GetTimelineResponse> {
    let entries = entries.into_iter().map(timeline_entry_to_proto);
    if !chunked {
        return entries
            .map(|entry| proto::GetTimelineResponse {
                entry: Some(entry),
                entries: Vec::new(),
            })
            .collect();
    }
    let mut messages = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        bytes += entry.encoded_len() + 4;
        chunk.push(entry);
        if bytes >= CHUNK_BYTES {
            messages.push(proto::GetTimelineResponse {
                entry: None,
                entries: std::mem::take(&mut chunk),
            });
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        messages.push(proto::GetTimelineResponse {
            entry: None,
            entries: chunk,
        });
    }
    messages
}
