//! Writing and reading the feeds: sentiments, events, and the records of committed
//! client streams. Batches are written with one `INSERT ... SELECT FROM UNNEST(...)`
//! statement each, so a batch of thousands of rows costs one round trip.

use std::future::Future;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::{PgConnection, PgPool, postgres::PgCopyIn};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Storage, batch::Batcher, copy::CopyEncoder, db_error};
use crate::domain::{
    Event, EventKind, FeedItem, NewEvent, NewSentiment, Participation, Receipt, Sentiment,
    SentimentLabel, TimelineEntry,
};
use crate::error::Error;

/// A feed item type with a table to write it to.
pub trait FeedTable: FeedItem + Clone + PartialEq + Sized {
    /// The batcher of the unary writes of this table.
    fn batcher(batchers: &Batchers) -> &Batcher<Self>;

    /// The binary COPY statement that loads the table inside a stream.
    const COPY_STATEMENT: &'static str;

    /// Encodes one item as a row of [`Self::COPY_STATEMENT`].
    fn encode_row(
        encoder: &mut CopyEncoder,
        id: Uuid,
        participation: &Participation,
        stream_id: Uuid,
        item: &Self,
    ) -> Result<(), Error>;

    /// Inserts items outside any stream, each for its own participation, in one
    /// statement: an item is stored when its participation exists, the item lies inside
    /// it, and its id is not taken (at any time: the key includes the timestamp, so the
    /// id is looked up across partitions, LATERAL with LIMIT 1 so that the look-up always
    /// probes the key by both id and user). Returns the ids stored; the caller finds out
    /// why any other was not.
    fn insert_checked<'c>(
        pool: &'c PgPool,
        rows: &'c [Unary<Self>],
    ) -> impl Future<Output = Result<Vec<Uuid>, Error>> + Send + 'c;

    /// The item stored under `id` for `user_id`, with its participation.
    fn stored(
        pool: &PgPool,
        user_id: Uuid,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<(Uuid, Self)>, Error>> + Send;
}

/// participation_id, started_at, ended_at, label, score.
type SentimentRow = (Uuid, DateTime<Utc>, DateTime<Utc>, String, Option<f64>);

impl FeedTable for NewSentiment {
    fn batcher(batchers: &Batchers) -> &Batcher<Self> {
        &batchers.sentiments
    }

    async fn stored(pool: &PgPool, user_id: Uuid, id: Uuid) -> Result<Option<(Uuid, Self)>, Error> {
        let row: Option<SentimentRow> = sqlx::query_as(
            "SELECT participation_id, started_at, ended_at, label, score FROM sentiments \
                 WHERE user_id = $1 AND id = $2",
        )
        .bind(user_id)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(db_error)?;
        row.map(|(participation_id, started_at, ended_at, label, score)| {
            let label = SentimentLabel::from_stored(&label)
                .ok_or_else(|| Error::internal(anyhow::anyhow!("stored label {label:?}")))?;
            Ok((
                participation_id,
                NewSentiment {
                    started_at,
                    ended_at,
                    label,
                    score,
                },
            ))
        })
        .transpose()
    }

    const COPY_STATEMENT: &'static str = "COPY sentiments \
         (id, user_id, participation_id, stream_id, started_at, ended_at, label, score) \
         FROM STDIN (FORMAT binary)";

    fn encode_row(
        encoder: &mut CopyEncoder,
        id: Uuid,
        participation: &Participation,
        stream_id: Uuid,
        item: &Self,
    ) -> Result<(), Error> {
        encoder
            .row(8)
            .uuid(id)
            .uuid(participation.user_id)
            .uuid(participation.id)
            .uuid(stream_id)
            .timestamptz(item.started_at)
            .timestamptz(item.ended_at)
            .text(item.label.as_str())
            .optional_float8(item.score);
        Ok(())
    }

    async fn insert_checked(pool: &PgPool, rows: &[Unary<Self>]) -> Result<Vec<Uuid>, Error> {
        let participations: Vec<Uuid> = rows.iter().map(|r| r.participation_id).collect();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let started: Vec<DateTime<Utc>> = rows.iter().map(|r| r.item.started_at).collect();
        let ended: Vec<DateTime<Utc>> = rows.iter().map(|r| r.item.ended_at).collect();
        let labels: Vec<&str> = rows.iter().map(|r| r.item.label.as_str()).collect();
        let scores: Vec<Option<f64>> = rows.iter().map(|r| r.item.score).collect();
        sqlx::query_scalar(
            "INSERT INTO sentiments \
               (id, user_id, participation_id, started_at, ended_at, label, score) \
             SELECT t.id, p.user_id, p.id, t.started_at, t.ended_at, t.label, t.score \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], \
                         $5::text[], $6::float8[]) \
                  AS t(participation_id, id, started_at, ended_at, label, score) \
             JOIN participations p ON p.id = t.participation_id \
             LEFT JOIN LATERAL (SELECT true AS taken FROM sentiments s \
                                WHERE s.user_id = p.user_id AND s.id = t.id LIMIT 1) x ON true \
             WHERE p.connected_at <= t.started_at \
               AND (p.disconnected_at IS NULL OR t.ended_at <= p.disconnected_at) \
               AND x.taken IS NULL \
             ON CONFLICT (id, user_id, started_at) DO NOTHING \
             RETURNING id",
        )
        .bind(participations)
        .bind(ids)
        .bind(started)
        .bind(ended)
        .bind(labels)
        .bind(scores)
        .fetch_all(pool)
        .await
        .map_err(db_error)
    }
}

impl FeedTable for NewEvent {
    fn batcher(batchers: &Batchers) -> &Batcher<Self> {
        &batchers.events
    }

    async fn stored(pool: &PgPool, user_id: Uuid, id: Uuid) -> Result<Option<(Uuid, Self)>, Error> {
        let row: Option<(Uuid, DateTime<Utc>, String, sqlx::types::JsonValue)> = sqlx::query_as(
            "SELECT participation_id, occurred_at, kind, attributes FROM events \
             WHERE user_id = $1 AND id = $2",
        )
        .bind(user_id)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(db_error)?;
        row.map(|(participation_id, occurred_at, kind, attributes)| {
            let kind = EventKind::from_stored(&kind)
                .ok_or_else(|| Error::internal(anyhow::anyhow!("stored event kind {kind:?}")))?;
            let attributes = serde_json::from_value(attributes).map_err(Error::internal)?;
            Ok((
                participation_id,
                NewEvent {
                    occurred_at,
                    kind,
                    attributes,
                },
            ))
        })
        .transpose()
    }

    const COPY_STATEMENT: &'static str = "COPY events \
         (id, user_id, participation_id, stream_id, occurred_at, kind, attributes) \
         FROM STDIN (FORMAT binary)";

    fn encode_row(
        encoder: &mut CopyEncoder,
        id: Uuid,
        participation: &Participation,
        stream_id: Uuid,
        item: &Self,
    ) -> Result<(), Error> {
        encoder
            .row(7)
            .uuid(id)
            .uuid(participation.user_id)
            .uuid(participation.id)
            .uuid(stream_id)
            .timestamptz(item.occurred_at)
            .text(item.kind.as_str())
            .jsonb_of(&item.attributes)
            .map_err(Error::internal)?;
        Ok(())
    }

    async fn insert_checked(pool: &PgPool, rows: &[Unary<Self>]) -> Result<Vec<Uuid>, Error> {
        let participations: Vec<Uuid> = rows.iter().map(|r| r.participation_id).collect();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let occurred: Vec<DateTime<Utc>> = rows.iter().map(|r| r.item.occurred_at).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.item.kind.as_str()).collect();
        let attributes = rows
            .iter()
            .map(|r| serde_json::to_string(&r.item.attributes))
            .collect::<Result<Vec<String>, _>>()
            .map_err(Error::internal)?;
        sqlx::query_scalar(
            "INSERT INTO events (id, user_id, participation_id, occurred_at, kind, attributes) \
             SELECT t.id, p.user_id, p.id, t.occurred_at, t.kind, t.attributes::jsonb \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[]) \
                  AS t(participation_id, id, occurred_at, kind, attributes) \
             JOIN participations p ON p.id = t.participation_id \
             LEFT JOIN LATERAL (SELECT true AS taken FROM events e \
                                WHERE e.user_id = p.user_id AND e.id = t.id LIMIT 1) x ON true \
             WHERE p.connected_at <= t.occurred_at \
               AND (p.disconnected_at IS NULL OR t.occurred_at <= p.disconnected_at) \
               AND x.taken IS NULL \
             ON CONFLICT (id, user_id, occurred_at) DO NOTHING \
             RETURNING id",
        )
        .bind(participations)
        .bind(ids)
        .bind(occurred)
        .bind(kinds)
        .bind(attributes)
        .fetch_all(pool)
        .await
        .map_err(db_error)
    }
}

/// The unary writers of each feed table.
#[derive(Debug)]
pub struct Batchers {
    pub sentiments: Batcher<NewSentiment>,
    pub events: Batcher<NewEvent>,
}

impl Batchers {
    pub fn spawn(pool: &PgPool, writers: usize) -> Self {
        Self {
            sentiments: Batcher::spawn(pool.clone(), writers),
            events: Batcher::spawn(pool.clone(), writers),
        }
    }
}

/// One item recorded by a unary RPC.
#[derive(Debug)]
pub struct Unary<T> {
    pub participation_id: Uuid,
    pub id: Uuid,
    pub item: T,
}

/// Bytes of COPY data buffered before they are sent: bounds a stream's memory.
pub const COPY_SEND_BYTES: usize = 256 * 1024;

/// A binary COPY in progress inside a stream's transaction.
pub struct FeedCopy<'c> {
    copy: PgCopyIn<&'c mut PgConnection>,
    encoder: CopyEncoder,
}

impl<'c> FeedCopy<'c> {
    pub async fn begin<T: FeedTable>(conn: &'c mut PgConnection) -> Result<Self, Error> {
        let copy = conn
            .copy_in_raw(T::COPY_STATEMENT)
            .await
            .map_err(db_error)?;
        Ok(Self {
            copy,
            encoder: CopyEncoder::new(COPY_SEND_BYTES + 4096),
        })
    }

    /// Encodes one item; sends the buffer to the server once it is full.
    pub async fn push<T: FeedTable>(
        &mut self,
        id: Uuid,
        participation: &Participation,
        stream_id: Uuid,
        item: &T,
    ) -> Result<(), Error> {
        T::encode_row(&mut self.encoder, id, participation, stream_id, item)?;
        if self.encoder.len() >= COPY_SEND_BYTES {
            self.copy
                .send(self.encoder.take())
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    /// Sends the rest and ends the COPY; the database checks its constraints here.
    pub async fn finish(mut self) -> Result<u64, Error> {
        let rest = std::mem::replace(&mut self.encoder, CopyEncoder::new(0)).finish();
        self.copy.send(rest).await.map_err(db_error)?;
        self.copy.finish().await.map_err(db_error)
    }

    /// Abandons the COPY, leaving the connection usable (the transaction then rolls back).
    pub async fn abort(self, reason: &str) {
        if let Err(error) = self.copy.abort(reason).await {
            tracing::debug!(%error, "aborting a COPY failed; the connection will be discarded");
        }
    }
}

/// What claiming a stream id found.
#[derive(Debug)]
pub enum StreamClaim {
    /// The id is new: this transaction owns it until it commits or rolls back.
    New,
    /// A stream with this id committed before.
    Committed {
        participation_id: Uuid,
        kind: String,
        receipt: Receipt,
    },
}

type StreamRow = (Uuid, String, i64, Option<DateTime<Utc>>);

/// Records `stream_id` inside the stream's transaction. A concurrent claim of the same id
/// waits for this transaction, then finds the committed stream (or claims it, if this
/// one rolled back): a stream id commits once.
pub async fn claim_stream(
    conn: &mut PgConnection,
    participation: &Participation,
    stream_id: Uuid,
    kind: &str,
) -> Result<StreamClaim, Error> {
    let inserted = sqlx::query(
        "INSERT INTO ingest_streams (user_id, stream_id, participation_id, kind) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, stream_id) DO NOTHING",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .bind(participation.id)
    .bind(kind)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?
    .rows_affected();
    if inserted == 1 {
        return Ok(StreamClaim::New);
    }
    let row: Option<StreamRow> = sqlx::query_as(
        "SELECT participation_id, kind, items_stored, committed_at FROM ingest_streams \
         WHERE user_id = $1 AND stream_id = $2",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    // The claim found the record, and records are deleted only with their participation,
    // which this call holds: anything else here is a broken invariant, not a client error.
    let broken = |what: &str| {
        Error::internal(anyhow::anyhow!(
            "stream record {stream_id}: {what} after its claim conflicted"
        ))
    };
    let (participation_id, kind, items_stored, committed_at) =
        row.ok_or_else(|| broken("not found"))?;
    Ok(StreamClaim::Committed {
        participation_id,
        kind,
        receipt: Receipt {
            stream_id,
            items_stored: u64::try_from(items_stored).map_err(|_| broken("negative count"))?,
            committed_at: committed_at.ok_or_else(|| broken("no commit time"))?,
            replayed: true,
        },
    })
}

/// Completes a claimed stream's record just before its transaction commits.
pub async fn finish_stream(
    conn: &mut PgConnection,
    participation: &Participation,
    stream_id: Uuid,
    items_stored: u64,
) -> Result<DateTime<Utc>, Error> {
    let items = i64::try_from(items_stored).map_err(Error::internal)?;
    sqlx::query_scalar(
        // statement_timestamp(), not clock_timestamp(): Citus refuses VOLATILE functions in
        // an UPDATE of a distributed table; a STABLE one without column arguments it
        // evaluates once, on the coordinator. This is the stream's last statement before
        // COMMIT, so the two differ by microseconds.
        "UPDATE ingest_streams SET items_stored = $3, committed_at = statement_timestamp() \
         WHERE user_id = $1 AND stream_id = $2 RETURNING committed_at",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .bind(items)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

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
        tokio::spawn(async move {
            let mut rows = sqlx::query_as::<_, TimelineRow>(
                "SELECT false AS is_event, id, started_at AS at, ended_at, label AS kind, score, \
                        NULL::jsonb AS attributes \
                 FROM sentiments WHERE user_id = $1 AND participation_id = $2 \
                 UNION ALL \
                 SELECT true, id, occurred_at, NULL, kind, NULL, attributes \
                 FROM events WHERE user_id = $1 AND participation_id = $2 \
                 ORDER BY at, is_event DESC, id",
            )
            .bind(user_id)
            .bind(participation_id)
            .fetch(&pool);
            loop {
                let item = match rows.try_next().await {
                    Ok(Some(row)) => timeline_entry(participation_id, row),
                    Ok(None) => break,
                    Err(error) => Err(db_error(error)),
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
