//! Live feeds (LiveFeed): a feed's record (its committed position and the epoch of the
//! stream allowed to write it), and the transaction of a batch of appends: advance each
//! feed's position from the one its writer knows, under its epoch, and store the items
//! of exactly those appends, together, refusing an append with an item past the end of
//! its participation (the writers are in `feed_writer.rs`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{copy::CopyEncoder, items::FeedTable};
use crate::domain::{FeedEntry, FeedItem, NewEvent, NewSentiment, Participation};
use crate::error::{Error, FieldViolation};

/// A feed as an Open left it: the stream holding `epoch` may write it.
#[derive(Debug, Clone)]
pub struct OpenFeed {
    pub feed_id: Uuid,
    pub participation: Participation,
    pub epoch: i64,
    pub committed_seq: u64,
    pub closed_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct FeedRow {
    epoch: i64,
    committed_seq: i64,
    closed_at: Option<DateTime<Utc>>,
}

/// Opens `feed_id` for a new stream: creates the feed, or takes it over (a new epoch:
/// the stream that held it can write no more). A feed belongs to the participation of
/// its first Open; another one is ALREADY_EXISTS.
pub async fn open_feed(
    pool: &PgPool,
    participation: &Participation,
    feed_id: Uuid,
) -> Result<OpenFeed, Error> {
    let row: Option<FeedRow> = sqlx::query_as(
        "INSERT INTO live_feeds (user_id, feed_id, participation_id) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id, feed_id) DO UPDATE SET epoch = live_feeds.epoch + 1 \
         WHERE live_feeds.participation_id = EXCLUDED.participation_id \
         RETURNING epoch, committed_seq, closed_at",
    )
    .bind(participation.user_id)
    .bind(feed_id)
    .bind(participation.id)
    .fetch_optional(pool)
    .await
    .map_err(|e| lost_at_commit(e, REOPEN))?;
    let Some(row) = row else {
        return Err(Error::AlreadyExists(format!(
            "feed id {feed_id} belongs to another participation of this user: a feed's \
             participation is fixed at its first Open; use a new feed_id"
        )));
    };
    Ok(OpenFeed {
        feed_id,
        participation: participation.clone(),
        epoch: row.epoch,
        committed_seq: u64::try_from(row.committed_seq).map_err(Error::internal)?,
        closed_at: row.closed_at,
    })
}

/// The refusal of a write by a stream whose feed was opened again since.
pub fn superseded(feed_id: Uuid) -> Error {
    Error::Superseded(format!(
        "feed {feed_id} was opened by a newer stream (or closed) since this stream opened \
         it; nothing of this write was stored: continue on the newer stream"
    ))
}

/// One append to write: `items`, numbered `from + 1` on, for the feed a stream holds
/// under `epoch`.
#[derive(Debug)]
pub struct Append {
    pub user_id: Uuid,
    pub feed_id: Uuid,
    pub participation_id: Uuid,
    pub epoch: i64,
    pub from: u64,
    pub items: Vec<FeedEntry>,
}

impl Append {
    fn through(&self) -> u64 {
        self.from + self.items.len() as u64
    }

    /// The refusal of this append when its participation ended at `left_at`, before the
    /// end of one of its items: the item that ends last is named.
    fn past(&self, left_at: DateTime<Utc>) -> Option<Error> {
        let (seq, end, field) = (self.from + 1..)
            .zip(&self.items)
            .map(|(seq, item)| match item {
                FeedEntry::Sentiment(s) => (seq, s.span().1, NewSentiment::END_FIELD),
                FeedEntry::Event(e) => (seq, e.span().1, NewEvent::END_FIELD),
            })
            .max_by_key(|(_, end, _)| *end)?;
        (end > left_at).then(|| {
            Error::InvalidArgument(vec![FieldViolation::new(
                format!("items[{seq}].{field}"),
                format!("is after the participation ended ({left_at}), while the feed was open"),
            )])
        })
    }
}

/// What became of an append of a batch.
#[derive(Debug)]
pub enum Appended {
    Stored,
    /// The feed was opened again (or closed) since this stream opened it.
    Superseded,
    /// Refused, and why: the user left the participation before one of its items ended.
    Refused(Error),
}

/// When each participation of `appends` that has been left ended: read in the batch's
/// transaction, so that a leave committed before it is seen. (A leave locks its
/// participation `FOR UPDATE`, and waits for the items of a batch that already checked
/// its foreign key on it; a batch that read the participation open before the leave and
/// checks its key after is not caught: docs/GUARANTEES.md, "A participation spans its
/// items".)
async fn left_participations(
    conn: &mut PgConnection,
    appends: &[Append],
) -> Result<HashMap<(Uuid, Uuid), DateTime<Utc>>, Error> {
    let users: Vec<Uuid> = appends.iter().map(|a| a.user_id).collect();
    let participations: Vec<Uuid> = appends.iter().map(|a| a.participation_id).collect();
    let left: Vec<(Uuid, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT p.user_id, p.id, p.disconnected_at FROM participations p \
         JOIN (SELECT * FROM unnest($1::uuid[], $2::uuid[])) AS u (user_id, id) \
           ON p.user_id = u.user_id AND p.id = u.id \
         WHERE p.disconnected_at IS NOT NULL AND p.user_id = ANY($1)",
    )
    .bind(&users)
    .bind(&participations)
    .fetch_all(&mut *conn)
    .await?;
    Ok(left
        .into_iter()
        .map(|(user, participation, at)| ((user, participation), at))
        .collect())
}

/// Writes `appends` (of different feeds, or of one feed by different epochs) in `conn`'s
/// transaction: advances each feed's position from the append's `from` to its last item
/// where the feed is still there under the append's epoch and open, and stores the
/// items of exactly those appends; an append with an item past the end of its
/// participation (left since the feed opened) is refused. Returns, per append, what
/// became of it.
pub async fn append_feeds(
    conn: &mut PgConnection,
    appends: &[Append],
) -> Result<Vec<Appended>, Error> {
    let left = left_participations(conn, appends).await?;
    let mut refused: Vec<Option<Error>> = appends
        .iter()
        .map(|a| {
            left.get(&(a.user_id, a.participation_id))
                .and_then(|at| a.past(*at))
        })
        .collect();
    let open: Vec<&Append> = appends
        .iter()
        .zip(&refused)
        .filter(|(_, refused)| refused.is_none())
        .map(|(append, _)| append)
        .collect();
    let written = advance_and_store(conn, &open).await?;
    let mut written = written.into_iter();
    Ok(refused
        .iter_mut()
        .map(|refused| match refused.take() {
            Some(error) => Appended::Refused(error),
            None if written.next().unwrap_or(false) => Appended::Stored,
            None => Appended::Superseded,
        })
        .collect())
}

/// Advances each feed of a batch (`$1` users, `$2` feeds, `$3` epochs, `$4` positions
/// written from, `$5` positions written through) where it is still at `from` under that
/// epoch and open; returns the feeds advanced.
///
/// Each feed by its key, in one statement for every feed of the batch. The subquery
/// keeps the arrays a relation of their own (Citus plans it as an intermediate result
/// joined on the distribution column), and `f.user_id = ANY($1)` lets Citus run it on the
/// shards of the batch's users only. A feed still open is matched as a join clause
/// against the subquery's NULL, not as a filter of `live_feeds` alone: the planner's
/// guess for `closed_at IS NULL` without statistics (1 row in 200) let a plan cached
/// while the table was empty scan the batch's users' feeds and re-read the arrays for
/// each one (docs/decisions/0012-feed-batches-planned-without-guesses.md).
pub const ADVANCE_FEEDS: &str = "UPDATE live_feeds AS f SET committed_seq = u.through \
     FROM (SELECT *, NULL::timestamptz FROM unnest($1::uuid[], $2::uuid[], $3::int8[], \
               $4::int8[], $5::int8[]) OFFSET 0) \
         AS u (user_id, feed_id, epoch, from_seq, through, closed_at) \
     WHERE f.user_id = u.user_id AND f.feed_id = u.feed_id AND f.epoch = u.epoch \
       AND f.committed_seq = u.from_seq AND f.closed_at IS NOT DISTINCT FROM u.closed_at \
       AND f.user_id = ANY($1) \
     RETURNING f.user_id, f.feed_id, f.epoch";

/// [`append_feeds`] for the appends not refused: whether each was written.
async fn advance_and_store(
    conn: &mut PgConnection,
    appends: &[&Append],
) -> Result<Vec<bool>, Error> {
    if appends.is_empty() {
        return Ok(Vec::new());
    }
    let seq = |n: u64| i64::try_from(n).map_err(Error::internal);
    let mut user_ids = Vec::with_capacity(appends.len());
    let mut feed_ids = Vec::with_capacity(appends.len());
    let mut epochs = Vec::with_capacity(appends.len());
    let mut froms = Vec::with_capacity(appends.len());
    let mut throughs = Vec::with_capacity(appends.len());
    for append in appends {
        user_ids.push(append.user_id);
        feed_ids.push(append.feed_id);
        epochs.push(append.epoch);
        froms.push(seq(append.from)?);
        throughs.push(seq(append.through())?);
    }
    let advanced: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(ADVANCE_FEEDS)
        .bind(&user_ids)
        .bind(&feed_ids)
        .bind(&epochs)
        .bind(&froms)
        .bind(&throughs)
        .fetch_all(&mut *conn)
        .await?;
    let written: Vec<bool> = appends
        .iter()
        .map(|a| advanced.contains(&(a.user_id, a.feed_id, a.epoch)))
        .collect();
    let mut sentiments = Vec::new();
    let mut events = Vec::new();
    for (append, _) in appends.iter().copied().zip(&written).filter(|(_, w)| **w) {
        for (n, item) in (append.from + 1..).zip(&append.items) {
            match item {
                FeedEntry::Sentiment(s) => sentiments.push((append, n, s)),
                FeedEntry::Event(e) => events.push((append, n, e)),
            }
        }
    }
    copy_items(conn, &sentiments).await?;
    copy_items(conn, &events).await?;
    Ok(written)
}

/// Binary COPY of one table's items of a batch of appends.
async fn copy_items<T: FeedTable>(
    conn: &mut PgConnection,
    items: &[(&Append, u64, &T)],
) -> Result<(), Error> {
    if items.is_empty() {
        return Ok(());
    }
    let mut rows = CopyEncoder::new(items.len() * 160);
    for (append, n, item) in items {
        rows.row(5 + T::ITEM_COLUMNS)
            .uuid(Uuid::now_v7())
            .uuid(append.user_id)
            .uuid(append.participation_id)
            .uuid(append.feed_id)
            .int8(i64::try_from(*n).map_err(Error::internal)?);
        item.encode_columns(&mut rows)?;
    }
    let mut copy = conn.copy_in_raw(T::FEED_COPY_STATEMENT).await?;
    copy.send(rows.finish()).await?;
    copy.finish().await?;
    Ok(())
}

/// Closes the feed at `final_seq` (its committed position); returns when. Refused
/// unless this stream's epoch still holds it and it is open at that position.
pub async fn close_feed(
    pool: &PgPool,
    feed: &OpenFeed,
    final_seq: u64,
) -> Result<DateTime<Utc>, Error> {
    // statement_timestamp(): STABLE without column arguments, as Citus requires in an
    // UPDATE of a distributed table (see streams::finish_stream).
    let closed: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE live_feeds SET closed_at = statement_timestamp() \
         WHERE user_id = $1 AND feed_id = $2 AND epoch = $3 AND committed_seq = $4 \
         AND closed_at IS NULL RETURNING closed_at",
    )
    .bind(feed.participation.user_id)
    .bind(feed.feed_id)
    .bind(feed.epoch)
    .bind(i64::try_from(final_seq).map_err(Error::internal)?)
    .fetch_optional(pool)
    .await
    .map_err(|e| lost_at_commit(e, REOPEN))?;
    closed.ok_or_else(|| superseded(feed.feed_id))
}

/// How a feed whose Open or Close may or may not have been stored goes on.
const REOPEN: &str = "open the feed again with the same feed_id: the answer says its position \
     stored and whether it is closed";

/// `error` of a statement that commits as it ends: when the connection was lost, the
/// outcome is unknown, and `retry` says how the feed goes on.
fn lost_at_commit(error: sqlx::Error, retry: &'static str) -> Error {
    match Error::from(error).at_commit() {
        Error::OutcomeUnknown { cause, .. } => Error::OutcomeUnknown { retry, cause },
        other => other,
    }
}
