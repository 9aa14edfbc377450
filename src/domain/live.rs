//! Resumable live feeds (LiveFeed): what a client sends and what the server answers.
//! Items are numbered from 1 per feed; the feed's committed position is the number of
//! its last stored item.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{NewEvent, NewSentiment};

/// One item of a feed.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedEntry {
    Sentiment(NewSentiment),
    Event(NewEvent),
}

/// A message of a live feed from the client, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedMessage {
    Open {
        feed_id: Uuid,
        participation_id: Uuid,
    },
    /// Items numbered consecutively from `first_seq` (at least 1); `bytes` is the
    /// message's size on the wire, counted against the feed's window of unacknowledged
    /// bytes.
    Append {
        first_seq: u64,
        items: Vec<FeedEntry>,
        bytes: usize,
    },
    Close {
        final_seq: u64,
    },
}

/// A message of a live feed from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedReply {
    Opened { committed_seq: u64, closed: bool },
    Ack { committed_through: u64 },
    Closed(FeedReceipt),
}

/// Proof of a closed feed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedReceipt {
    pub feed_id: Uuid,
    pub items_stored: u64,
    pub closed_at: DateTime<Utc>,
}
