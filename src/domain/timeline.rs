//! A participation's timeline: its entries, their order, and which of them a read
//! returns.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Event, Sentiment};

/// One entry of a participation's timeline.
#[derive(Debug, Clone, PartialEq)]
pub enum TimelineEntry {
    Sentiment(Sentiment),
    Event(Event),
}

/// The kind of an entry. The order of the variants is the timeline's at one instant:
/// events first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    Event,
    Sentiment,
}

/// A place in a timeline. Positions order as the timeline does: by time, then kind, then
/// id; no two entries share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelinePosition {
    pub at: DateTime<Utc>,
    pub kind: EntryKind,
    pub id: Uuid,
}

impl TimelineEntry {
    pub fn position(&self) -> TimelinePosition {
        match self {
            Self::Sentiment(s) => TimelinePosition {
                at: s.sentiment.started_at,
                kind: EntryKind::Sentiment,
                id: s.id,
            },
            Self::Event(e) => TimelinePosition {
                at: e.event.occurred_at,
                kind: EntryKind::Event,
                id: e.id,
            },
        }
    }
}

/// Which entries a timeline read returns: those in `[from, until)` and after `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimelineRange {
    from: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    after: Option<TimelinePosition>,
}

impl TimelineRange {
    /// Every entry.
    pub fn all() -> Self {
        Self::default()
    }

    /// The entries in `[from, until)`: `until` must be after `from`.
    pub fn between(
        from: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Self, String> {
        match (from, until) {
            (Some(from), Some(until)) if until <= from => Err(format!(
                "must be after start_time ({from}): the range is half-open, [start_time, end_time)"
            )),
            _ => Ok(Self {
                from,
                until,
                after: None,
            }),
        }
    }

    /// The same range, only after `position`.
    pub fn after(self, position: TimelinePosition) -> Self {
        Self {
            after: Some(position),
            ..self
        }
    }

    pub fn from(&self) -> Option<DateTime<Utc>> {
        self.from
    }

    pub fn until(&self) -> Option<DateTime<Utc>> {
        self.until
    }

    pub fn after_position(&self) -> Option<TimelinePosition> {
        self.after
    }

    /// Whether the range holds the entry at `position`.
    pub fn contains(&self, position: &TimelinePosition) -> bool {
        self.from.is_none_or(|from| position.at >= from)
            && self.until.is_none_or(|until| position.at < until)
            && self.after.is_none_or(|after| *position > after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn a_range_is_half_open_and_refuses_an_end_not_after_its_start() {
        let range = TimelineRange::between(Some(at(0)), Some(at(10))).unwrap();
        let position = |seconds, kind| TimelinePosition {
            at: at(seconds),
            kind,
            id: Uuid::nil(),
        };
        assert!(range.contains(&position(0, EntryKind::Event)));
        assert!(range.contains(&position(9, EntryKind::Sentiment)));
        assert!(!range.contains(&position(10, EntryKind::Event)));
        assert!(!range.contains(&position(-1, EntryKind::Sentiment)));
        assert!(TimelineRange::between(Some(at(10)), Some(at(10))).is_err());
        assert!(TimelineRange::between(Some(at(10)), Some(at(9))).is_err());
        assert!(TimelineRange::between(None, Some(at(9))).is_ok());
    }

    #[test]
    fn positions_order_by_time_then_events_first_then_id() {
        let (low, high) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let p = |seconds, kind, id| TimelinePosition {
            at: at(seconds),
            kind,
            id,
        };
        let mut positions = vec![
            p(1, EntryKind::Sentiment, low),
            p(0, EntryKind::Sentiment, high),
            p(1, EntryKind::Event, high),
            p(1, EntryKind::Sentiment, high),
            p(1, EntryKind::Event, low),
        ];
        positions.sort();
        assert_eq!(
            positions,
            vec![
                p(0, EntryKind::Sentiment, high),
                p(1, EntryKind::Event, low),
                p(1, EntryKind::Event, high),
                p(1, EntryKind::Sentiment, low),
                p(1, EntryKind::Sentiment, high),
            ]
        );
        let resumed = TimelineRange::all().after(p(1, EntryKind::Event, high));
        assert!(!resumed.contains(&p(1, EntryKind::Event, low)));
        assert!(!resumed.contains(&p(1, EntryKind::Event, high)));
        assert!(resumed.contains(&p(1, EntryKind::Sentiment, low)));
    }
}
