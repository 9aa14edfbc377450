//! A participation's timeline: its sentiments and events in time order, streamed.

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Storage;
use crate::domain::{
    Event, EventKind, NewEvent, NewSentiment, Participation, Sentiment, SentimentLabel,
    TimelineEntry,
};
use crate::error::Error;

type TimelineRow = (
    bool,
    Uuid,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    String,
    Option<f64>,
    Option<sqlx::types::JsonValue>,
);

fn timeline_entry(participation_id: Uuid, row: TimelineRow) -> Result<TimelineEntry, Error> {
    let (is_event, id, at, ended_at, kind, score, attributes) = row;
    let corrupt = |what: &str| Error::internal(anyhow::anyhow!("stored {what} is unreadable"));
    if is_event {
        let kind = EventKind::from_stored(&kind).ok_or_else(|| corrupt("event kind"))?;
        let attributes = serde_json::from_value(attributes.unwrap_or_default())
            .map_err(|_| corrupt("event attributes"))?;
        Ok(TimelineEntry::Event(Event {
            id,
            participation_id,
            event: NewEvent {
                occurred_at: at,
                kind,
                attributes,
            },
        }))
    } else {
        let label = SentimentLabel::from_stored(&kind).ok_or_else(|| corrupt("label"))?;
        Ok(TimelineEntry::Sentiment(Sentiment {
            id,
            participation_id,
            sentiment: NewSentiment {
                started_at: at,
                ended_at: ended_at.ok_or_else(|| corrupt("sentiment end"))?,
                label,
                score,
            },
        }))
    }
}

/// Rows in flight between the query and the client; bounds the memory of a timeline.
const TIMELINE_BUFFER: usize = 256;

impl Storage {
    /// A participation's sentiments and events in time order, produced as they are read.
    pub fn timeline(
        &self,
        participation: &Participation,
    ) -> mpsc::Receiver<Result<TimelineEntry, Error>> {
        let (tx, rx) = mpsc::channel(TIMELINE_BUFFER);
        let pool: PgPool = self.pool.clone();
        let (user_id, participation_id) = (participation.user_id, participation.id);
        let connected_at = participation.connected_at;
        tokio::spawn(async move {
            // No item starts before its participation connected (every way in checks it),
            // and saying so lets PostgreSQL leave the older partitions out: with a year of
            // daily partitions the query took 17 ms without it and 0.35 ms with it
            // (docs/decisions/0011-timeline-bounded-and-planned-per-call.md). No upper
            // bound: a leave does not move items
            // recorded ahead of it. Not a prepared statement: a plan made for these
            // parameters leaves the partitions out before locking them, where a generic
            // plan (which PostgreSQL also builds at a prepared statement's sixth run, to
            // compare) locks all of them, ~3,000 locks with a year of partitions: 16
            // timelines at once ran out of the lock table ("out of shared memory").
            let mut rows = sqlx::query_as::<_, TimelineRow>(
                "SELECT false AS is_event, id, started_at AS at, ended_at, label AS kind, score, \
                        NULL::jsonb AS attributes \
                 FROM sentiments \
                 WHERE user_id = $1 AND participation_id = $2 AND started_at >= $3 \
                 UNION ALL \
                 SELECT true, id, occurred_at, NULL, kind, NULL, attributes \
                 FROM events \
                 WHERE user_id = $1 AND participation_id = $2 AND occurred_at >= $3 \
                 ORDER BY at, is_event DESC, id",
            )
            .bind(user_id)
            .bind(participation_id)
            .bind(connected_at)
            .persistent(false)
            .fetch(&pool);
            loop {
                let item = match rows.try_next().await {
                    Ok(Some(row)) => timeline_entry(participation_id, row),
                    Ok(None) => break,
                    Err(error) => Err(Error::from(error)),
                };
                let failed = item.is_err();
                // A closed channel means the client went away: stop reading.
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        rx
    }
}
