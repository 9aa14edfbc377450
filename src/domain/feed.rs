//! What is recorded during a participation (sentiments, events), and the framing of
//! the client streams that carry them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::FieldViolation;
use super::check_text;

stored_enum!(
    /// The sentiment detected in a segment of speech.
    SentimentLabel {
        Positive => "positive",
        Neutral => "neutral",
        Negative => "negative",
    }
);

stored_enum!(
    /// What happened in a user's journey through a session.
    EventKind {
        Connected => "connected",
        Disconnected => "disconnected",
        MicrophoneMuted => "microphone_muted",
        MicrophoneUnmuted => "microphone_unmuted",
        SpeakerOn => "speaker_on",
        SpeakerOff => "speaker_off",
        TalkStarted => "talk_started",
        TalkStopped => "talk_stopped",
        NoiseCancellationOn => "noise_cancellation_on",
        NoiseCancellationOff => "noise_cancellation_off",
        ScreenShareStarted => "screen_share_started",
        ScreenShareStopped => "screen_share_stopped",
    }
);

/// A sentiment segment to record: it ends after it starts, and its score (when given)
/// is finite and within -1..=1.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSentiment {
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub label: SentimentLabel,
    pub score: Option<f64>,
}

impl NewSentiment {
    /// The score rule: absent, or a finite number within -1.0..=1.0.
    pub fn parse_score(score: Option<f64>) -> Result<Option<f64>, String> {
        match score {
            Some(x) if !x.is_finite() || !(-1.0..=1.0).contains(&x) => {
                Err(format!("must be a finite number from -1.0 to 1.0, got {x}"))
            }
            _ => Ok(score),
        }
    }

    pub fn parse(
        started_at: DateTime<Utc>,
        ended_at: DateTime<Utc>,
        label: SentimentLabel,
        score: Option<f64>,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if ended_at <= started_at {
            violations.push(FieldViolation::new(
                "ended_at",
                format!("must be after started_at ({started_at}), got {ended_at}"),
            ));
        }
        if let Err(why) = Self::parse_score(score) {
            violations.push(FieldViolation::new("score", why));
        }
        if violations.is_empty() {
            Ok(Self {
                started_at,
                ended_at,
                label,
                score,
            })
        } else {
            Err(violations)
        }
    }
}

/// A stored sentiment segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Sentiment {
    pub id: Uuid,
    pub participation_id: Uuid,
    pub sentiment: NewSentiment,
}

/// An event to record, with at most [`NewEvent::MAX_ATTRIBUTES`] attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub occurred_at: DateTime<Utc>,
    pub kind: EventKind,
    pub attributes: BTreeMap<String, String>,
}

impl NewEvent {
    pub const MAX_ATTRIBUTES: usize = 32;

    pub fn parse(
        occurred_at: DateTime<Utc>,
        kind: EventKind,
        attributes: BTreeMap<String, String>,
    ) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        if attributes.len() > Self::MAX_ATTRIBUTES {
            violations.push(FieldViolation::new(
                "attributes",
                format!(
                    "must have at most {} entries, got {}",
                    Self::MAX_ATTRIBUTES,
                    attributes.len()
                ),
            ));
        }
        for (key, value) in &attributes {
            // Field paths carry at most the start of a key: errors travel in HTTP/2 headers.
            let field = || {
                let shown: String = key.chars().take(40).collect();
                let more = if shown.len() < key.len() { "..." } else { "" };
                format!("attributes[{shown:?}{more}]")
            };
            if let Err(why) = check_text(key, 1, 64) {
                violations.push(FieldViolation::new(field(), format!("key {why}")));
            }
            if let Err(why) = check_text(value, 0, 1024) {
                violations.push(FieldViolation::new(field(), format!("value {why}")));
            }
        }
        if violations.is_empty() {
            Ok(Self {
                occurred_at,
                kind,
                attributes,
            })
        } else {
            Err(violations)
        }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub participation_id: Uuid,
    pub event: NewEvent,
}

/// What the items of a client stream are: how to name them in errors, and the span of
/// time each covers (which must lie inside its participation).
pub trait FeedItem: Send + Sync + 'static {
    /// The stream kind recorded with the commit (`ingest_streams.kind`).
    const KIND: &'static str;
    /// The field path of the items in requests, e.g. `sentiments` in `sentiments[3]`.
    const FIELD: &'static str;
    /// The field path of one item in a unary request, e.g. `sentiment`.
    const NAME: &'static str;
    /// The fields holding the item's start and end.
    const START_FIELD: &'static str;
    const END_FIELD: &'static str;

    /// The item as stored, under `id`.
    type Stored;
    fn into_stored(self, id: Uuid, participation_id: Uuid) -> Self::Stored;

    fn span(&self) -> (DateTime<Utc>, DateTime<Utc>);
}

impl FeedItem for NewSentiment {
    const KIND: &'static str = "sentiments";
    const FIELD: &'static str = "sentiments";
    const NAME: &'static str = "sentiment";
    const START_FIELD: &'static str = "started_at";
    const END_FIELD: &'static str = "ended_at";
    type Stored = Sentiment;

    fn into_stored(self, id: Uuid, participation_id: Uuid) -> Sentiment {
        let sentiment = self;
        Sentiment {
            id,
            participation_id,
            sentiment,
        }
    }

    fn span(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.started_at, self.ended_at)
    }
}

impl FeedItem for NewEvent {
    const KIND: &'static str = "events";
    const FIELD: &'static str = "events";
    const NAME: &'static str = "event";
    const START_FIELD: &'static str = "occurred_at";
    const END_FIELD: &'static str = "occurred_at";
    type Stored = Event;

    fn into_stored(self, id: Uuid, participation_id: Uuid) -> Event {
        let event = self;
        Event {
            id,
            participation_id,
            event,
        }
    }

    fn span(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.occurred_at, self.occurred_at)
    }
}

/// The first message of a client stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub stream_id: Uuid,
    pub participation_id: Uuid,
}

/// One message of a client stream, converted and validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<T> {
    Header(StreamHeader),
    Batch(Vec<T>),
    Trailer { item_count: u64 },
}

/// Proof of a committed stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub stream_id: Uuid,
    pub items_stored: u64,
    pub committed_at: DateTime<Utc>,
    pub replayed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap_or_default()
    }

    #[test]
    fn sentiments_end_after_they_start() {
        assert!(NewSentiment::parse(at(0), at(1), SentimentLabel::Neutral, None).is_ok());
        let err = NewSentiment::parse(at(1), at(1), SentimentLabel::Neutral, None);
        assert_eq!(
            err.map_err(|v| v[0].field.clone()),
            Err("ended_at".to_owned())
        );
    }

    #[test]
    fn scores_are_finite_and_in_range() {
        for bad in [f64::NAN, f64::INFINITY, -1.0001, 2.0] {
            let err = NewSentiment::parse(at(0), at(1), SentimentLabel::Positive, Some(bad));
            assert_eq!(
                err.map_err(|v| v[0].field.clone()),
                Err("score".to_owned()),
                "{bad}"
            );
        }
        assert!(NewSentiment::parse(at(0), at(1), SentimentLabel::Positive, Some(-1.0)).is_ok());
    }

    #[test]
    fn event_attributes_are_bounded() {
        let many: BTreeMap<_, _> = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(NewEvent::parse(at(0), EventKind::Connected, many).is_err());
        let nul = BTreeMap::from([("k".to_owned(), "a\0".to_owned())]);
        assert!(NewEvent::parse(at(0), EventKind::Connected, nul).is_err());
        let ok = BTreeMap::from([("device".to_owned(), "AirPods".to_owned())]);
        assert!(NewEvent::parse(at(0), EventKind::Connected, ok).is_ok());
    }

    #[test]
    fn huge_keys_are_named_by_their_start() {
        // Found by the hostile-input property test: a 3,000-character key in a field
        // path made the error trailers too large for HTTP/2.
        let huge = BTreeMap::from([("k".repeat(3000), String::new())]);
        let Err(violations) = NewEvent::parse(at(0), EventKind::Connected, huge) else {
            panic!("a 3,000-character key must be refused");
        };
        assert!(violations[0].field.len() < 60, "{}", violations[0].field);
        assert!(
            violations[0].field.ends_with("...]"),
            "{}",
            violations[0].field
        );
    }

    #[test]
    fn stored_names_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_stored(kind.as_str()), Some(*kind));
        }
        for label in SentimentLabel::ALL {
            assert_eq!(SentimentLabel::from_stored(label.as_str()), Some(*label));
        }
    }
}
