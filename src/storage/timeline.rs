//! A participation's timeline: its sentiments and events in time order, streamed; and
//! the stored items of a live feed, read back to check a resend.

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{OpenFeed, Storage, call};
use crate::domain::{
    EntryKind, Event, EventKind, FeedEntry, NewEvent, NewSentiment, Participation, Sentiment,
    SentimentLabel, TimelineEntry, TimelineRange,
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

/// Rows one chunk holds at most: a chunk is what the query has ready, up to this.
const CHUNK_ROWS: usize = 256;
/// Chunks in flight between the query and the client; with [`CHUNK_ROWS`], bounds the
/// memory of a timeline read, however slow its client.
const TIMELINE_BUFFER: usize = 2;

/// The statement of a timeline read of `range`: `$1` the user, `$2` the participation,
/// `$3` the lower time bound (the latest of the participation's start, the range's start
/// and the position's time), then `$4` the range's end when it has one, then the position
/// when the range has one (its time, its kind's rank: 0 an event, 1 a sentiment; its id).
///
/// No item starts before its participation connected (every way in checks it), and
/// saying so lets PostgreSQL leave the older partitions out: with a year of daily
/// partitions the query took 17 ms without it and 0.35 ms with it
/// (docs/decisions/0011-timeline-bounded-and-planned-per-call.md). The order is the
/// timeline's: time, events before sentiments, id.
pub fn timeline_sql(range: &TimelineRange) -> String {
    let mut next = 4;
    let mut param = || {
        let n = next;
        next += 1;
        n
    };
    let until = range.until().map(|_| param());
    let after = range.after_position().map(|_| (param(), param(), param()));
    let bounds = |time: &str, rank: u8| {
        let mut sql = format!("{time} >= $3");
        if let Some(until) = until {
            sql.push_str(&format!(" AND {time} < ${until}"));
        }
        if let Some((at, kind, id)) = after {
            sql.push_str(&format!(
                " AND ({time}, {rank}, id) > (${at}, ${kind}, ${id})"
            ));
        }
        sql
    };
    format!(
        "SELECT false AS is_event, id, started_at AS at, ended_at, label AS kind, score, \
                NULL::jsonb AS attributes \
         FROM sentiments \
         WHERE user_id = $1 AND participation_id = $2 AND {} \
         UNION ALL \
         SELECT true, id, occurred_at, NULL, kind, NULL, attributes \
         FROM events \
         WHERE user_id = $1 AND participation_id = $2 AND {} \
         ORDER BY at, is_event DESC, id",
        bounds("started_at", 1),
        bounds("occurred_at", 0)
    )
}

/// The lower time bound of a read of `range` in `participation`'s timeline (`$3`).
pub fn timeline_lower_bound(participation: &Participation, range: &TimelineRange) -> DateTime<Utc> {
    [range.from(), range.after_position().map(|p| p.at)]
        .into_iter()
        .flatten()
        .fold(participation.connected_at, DateTime::max)
}

impl Storage {
    /// The entries of `range` in a participation's timeline, in timeline order, in
    /// chunks as they are read. One statement, so one snapshot: an item committed while
    /// it runs is wholly in or wholly out. Dropping the receiver stops the read.
    pub fn timeline(
        &self,
        participation: &Participation,
        range: TimelineRange,
    ) -> mpsc::Receiver<Result<Vec<TimelineEntry>, Error>> {
        let (tx, rx) = mpsc::channel(TIMELINE_BUFFER);
        let pool: PgPool = self.pool.clone();
        let (user_id, participation_id) = (participation.user_id, participation.id);
        let lower = timeline_lower_bound(participation, &range);
        tokio::spawn(async move {
            let gone = tx.clone();
            let read = async {
                let mut conn = pool.acquire().await?;
                let started = std::time::Instant::now();
                let pid = call::backend_pid(&mut conn).await?;
                let abandoned = tokio::select! {
                    () = gone.closed() => true,
                    gone = read_chunks(&mut conn, user_id, participation_id, lower, range, &tx) => gone?,
                };
                if abandoned {
                    // The client went away: PostgreSQL need not send the rest for nobody.
                    call::cancel_abandoned(&pool, conn, pid).await;
                } else {
                    crate::metrics::db_time("timeline_read", started);
                }
                Ok::<_, Error>(())
            };
            if let Err(error) = read.await {
                let _ = tx.send(Err(error)).await;
            }
        });
        rx
    }
}

/// Reads `range` of a timeline into `tx`, chunk by chunk, until its end or until the
/// client goes away (then `true`).
async fn read_chunks(
    conn: &mut PgConnection,
    user_id: Uuid,
    participation_id: Uuid,
    lower: DateTime<Utc>,
    range: TimelineRange,
    tx: &mpsc::Sender<Result<Vec<TimelineEntry>, Error>>,
) -> Result<bool, Error> {
    let sql = timeline_sql(&range);
    let mut query = sqlx::query_as::<_, TimelineRow>(&sql)
        .bind(user_id)
        .bind(participation_id)
        .bind(lower);
    if let Some(until) = range.until() {
        query = query.bind(until);
    }
    if let Some(after) = range.after_position() {
        let rank: i32 = match after.kind {
            EntryKind::Event => 0,
            EntryKind::Sentiment => 1,
        };
        query = query.bind(after.at).bind(rank).bind(after.id);
    }
    // Not a prepared statement: a plan made for these parameters leaves the partitions
    // out before locking them, where a generic plan (which PostgreSQL also builds at a
    // prepared statement's sixth run, to compare) locks all of them, ~3,000 locks with a
    // year of partitions: 16 timelines at once ran out of the lock table ("out of shared
    // memory"). No upper bound of its own: a leave does not move items recorded ahead of
    // it.
    let mut chunks = query.persistent(false).fetch(conn).ready_chunks(CHUNK_ROWS);
    while let Some(rows) = chunks.next().await {
        let entries = rows
            .into_iter()
            .map(|row| timeline_entry(participation_id, row?))
            .collect::<Result<Vec<_>, Error>>()?;
        if tx.send(Ok(entries)).await.is_err() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A stored item of a live feed: its number, then a [`TimelineRow`].
type FeedItemRow = (
    i64,
    bool,
    Uuid,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    String,
    Option<f64>,
    Option<sqlx::types::JsonValue>,
);

impl Storage {
    /// The items of `feed` numbered `from..=through` that are stored, by number: what a
    /// resend of them must match. Items the retention dropped are missing.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn stored_feed_items(
        &self,
        feed: &OpenFeed,
        from: u64,
        through: u64,
    ) -> Result<Vec<(u64, FeedEntry)>, Error> {
        let participation = &feed.participation;
        let to_i64 = |n: u64| i64::try_from(n).map_err(Error::internal);
        let rows: Vec<FeedItemRow> = sqlx::query_as(
            "SELECT feed_seq, false, id, started_at, ended_at, label, score, NULL::jsonb \
                 FROM sentiments WHERE user_id = $1 AND stream_id = $2 \
                   AND feed_seq BETWEEN $3 AND $4 AND started_at >= $5 \
                 UNION ALL \
                 SELECT feed_seq, true, id, occurred_at, NULL, kind, NULL, attributes \
                 FROM events WHERE user_id = $1 AND stream_id = $2 \
                   AND feed_seq BETWEEN $3 AND $4 AND occurred_at >= $5",
        )
        .bind(participation.user_id)
        .bind(feed.feed_id)
        .bind(to_i64(from)?)
        .bind(to_i64(through)?)
        .bind(participation.connected_at)
        .persistent(false)
        .fetch_all(&self.feed_pool)
        .await?;
        rows.into_iter()
            .map(
                |(seq, is_event, id, at, ended_at, kind, score, attributes)| {
                    let entry = match timeline_entry(
                        participation.id,
                        (is_event, id, at, ended_at, kind, score, attributes),
                    )? {
                        TimelineEntry::Sentiment(s) => FeedEntry::Sentiment(s.sentiment),
                        TimelineEntry::Event(e) => FeedEntry::Event(e.event),
                    };
                    Ok((u64::try_from(seq).map_err(Error::internal)?, entry))
                },
            )
            .collect()
    }
}
