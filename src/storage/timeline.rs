//! A participation's timeline: its sentiments and events in time order, streamed; and
//! the stored items of a live feed, read back to check a resend.

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sqlx::{PgPool, Postgres, pool::PoolConnection};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::copy_out::{CopyDecoder, CopyRow};
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

/// Rows a chunk holds: the first chunk is what the query has ready (a reader waiting for
/// its first entry waits for no more); later ones gather at least this many (fewer only
/// at the end, and under twice as many), however few rows each read from PostgreSQL
/// brings, so that a chunked read makes few messages.
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

/// The timeline read of `range` as `COPY (...) TO STDOUT (FORMAT binary)`, with
/// [`timeline_literal_sql`]. Planned for its values at every read, as [`timeline_sql`]
/// is sent unprepared.
pub fn timeline_copy_sql(
    user_id: Uuid,
    participation_id: Uuid,
    lower: DateTime<Utc>,
    range: &TimelineRange,
) -> String {
    let sql = timeline_literal_sql(user_id, participation_id, lower, range);
    format!("COPY ({sql}) TO STDOUT (FORMAT binary)")
}

/// The statement of [`timeline_sql`] with its values written in as literals, as COPY
/// needs (it takes no parameters). Every value is typed, a uuid, a time or a rank, and
/// so written by the server, never taken from a client's text.
pub fn timeline_literal_sql(
    user_id: Uuid,
    participation_id: Uuid,
    lower: DateTime<Utc>,
    range: &TimelineRange,
) -> String {
    let time = |at: DateTime<Utc>| {
        format!(
            "'{}'::timestamptz",
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        )
    };
    let mut values = vec![
        format!("'{user_id}'::uuid"),
        format!("'{participation_id}'::uuid"),
        time(lower),
    ];
    values.extend(range.until().map(time));
    if let Some(after) = range.after_position() {
        values.push(time(after.at));
        values.push(kind_rank(after.kind).to_string());
        values.push(format!("'{}'::uuid", after.id));
    }
    // From the last parameter down, so that `$1` never matches the start of `$10`.
    values
        .iter()
        .enumerate()
        .rev()
        .fold(timeline_sql(range), |sql, (i, value)| {
            sql.replace(&format!("${}", i + 1), value)
        })
}

/// An entry kind's rank in timeline order at one instant: events first.
fn kind_rank(kind: EntryKind) -> i32 {
    match kind {
        EntryKind::Event => 0,
        EntryKind::Sentiment => 1,
    }
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
            let read = async {
                let mut conn = pool.acquire().await?;
                let started = std::time::Instant::now();
                let pid = call::backend_pid(&mut conn).await?;
                let sql = timeline_copy_sql(user_id, participation_id, lower, &range);
                let mut copy = TimelineCopy {
                    conn: &mut conn,
                    pool: &pool,
                    pid,
                    ended: false,
                    cancelled: false,
                };
                let outcome = copy.read(participation_id, &sql, &tx).await;
                let (ended, cancelled) = (copy.ended, copy.cancelled);
                if !ended {
                    // The COPY's messages are still on the wire: no other call may read them.
                    conn.close_on_drop();
                } else if cancelled {
                    call::after_cancel(&mut conn).await;
                } else if outcome.is_ok() {
                    crate::metrics::db_time("timeline_read", started);
                }
                outcome
            };
            if let Err(error) = read.await {
                let _ = tx.send(Err(error)).await;
            }
        });
        rx
    }
}

/// A timeline's COPY on its connection, read to its end whatever the client does: a
/// COPY left half read would leave its rows on the wire for the connection's next call.
struct TimelineCopy<'a> {
    conn: &'a mut PoolConnection<Postgres>,
    pool: &'a PgPool,
    /// The backend, to cancel the COPY when the client goes away.
    pid: i32,
    /// Whether the COPY ended (all its rows, or an error): the connection is clean.
    ended: bool,
    /// Whether the COPY was cancelled because the client went away.
    cancelled: bool,
}

impl TimelineCopy<'_> {
    /// Reads the timeline of `sql` (from [`timeline_copy_sql`]) into `tx`, chunk by chunk.
    /// When the client goes away, PostgreSQL is asked to stop (it need not send the rest
    /// for nobody) and what it still sends is read and dropped.
    ///
    /// Binary COPY: its rows cost the server far less to decode than a query's
    /// (docs/decisions/0013-timeline-read-with-binary-copy.md). Planned for its values,
    /// like any unprepared statement: a plan made for these values leaves the partitions
    /// out before locking them, where a generic plan locks all of them (~3,000 locks with
    /// a year of partitions: 16 timelines at once ran out of the lock table). No upper
    /// bound of its own: a leave does not move items recorded ahead of it.
    async fn read(
        &mut self,
        participation_id: Uuid,
        sql: &str,
        tx: &mpsc::Sender<Result<Vec<TimelineEntry>, Error>>,
    ) -> Result<(), Error> {
        let mut data = match self.conn.copy_out_raw(sql).await {
            Ok(data) => data.ready_chunks(CHUNK_ROWS),
            Err(error) => {
                // Refused before any row: the statement has ended.
                self.ended = true;
                return Err(error.into());
            }
        };
        let mut decoder = CopyDecoder::default();
        let mut pending: Vec<TimelineEntry> = Vec::new();
        let mut first = true;
        let mut gone = false;
        let mut failed = None;
        loop {
            let pieces = tokio::select! {
                biased;
                () = tx.closed(), if !gone => {
                    gone = true;
                    self.cancelled = call::cancel_backend(self.pool, self.pid).await.is_ok();
                    continue;
                }
                pieces = data.next() => pieces,
            };
            let Some(pieces) = pieces else {
                self.ended = true;
                break;
            };
            for piece in pieces {
                match piece {
                    // sqlx reads the COPY's error up to its ReadyForQuery: it has ended.
                    Err(error) => {
                        self.ended = true;
                        failed.get_or_insert(Error::from(error));
                    }
                    Ok(piece) if !gone && failed.is_none() => decoder.push(&piece),
                    Ok(_) => {}
                }
            }
            if self.ended {
                break;
            }
            if gone || failed.is_some() {
                continue;
            }
            match decoded(&mut decoder, participation_id) {
                Ok(entries) => pending.extend(entries),
                Err(error) => {
                    failed = Some(error);
                    continue;
                }
            }
            let chunk = first || pending.len() >= CHUNK_ROWS || decoder.ended();
            if chunk && !pending.is_empty() {
                first = false;
                if tx.send(Ok(std::mem::take(&mut pending))).await.is_err() {
                    gone = true;
                    self.cancelled = call::cancel_backend(self.pool, self.pid).await.is_ok();
                }
            }
        }
        match failed {
            // An error after the client went away is the cancel's, which nobody reads.
            Some(_) if gone => Ok(()),
            Some(error) => Err(error),
            None if !gone && !decoder.ended() => Err(Error::internal(anyhow::anyhow!(
                "the timeline's COPY data ended without its end marker"
            ))),
            None => Ok(()),
        }
    }
}

/// The entries of the whole rows `decoder` holds.
fn decoded(decoder: &mut CopyDecoder, participation_id: Uuid) -> Result<Vec<TimelineEntry>, Error> {
    let mut entries = Vec::new();
    while let Some(row) = decoder.next_row()? {
        entries.push(timeline_entry(participation_id, copied_row(row)?)?);
    }
    Ok(entries)
}

/// A [`TimelineRow`] from its binary COPY row.
fn copied_row(mut row: CopyRow) -> Result<TimelineRow, Error> {
    Ok((
        row.bool()?,
        row.uuid()?,
        row.timestamptz()?,
        row.optional_timestamptz()?,
        row.text()?,
        row.optional_float8()?,
        row.optional_jsonb()?,
    ))
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
