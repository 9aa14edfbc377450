//! Live feeds (LiveFeed): a feed's record (its committed position and the epoch of the
//! stream allowed to write it), and the transaction of one append: advance the position
//! from the one the writer knows, under its epoch, and store the items, together.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{copy::CopyEncoder, items::FeedTable};
use crate::domain::{FeedEntry, NewEvent, NewSentiment, Participation};
use crate::error::Error;

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
    .await?;
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
fn superseded(feed: &OpenFeed) -> Error {
    Error::Superseded(format!(
        "feed {} was opened by a newer stream (or closed) since this stream opened it; \
         nothing of this append was stored: continue on the newer stream",
        feed.feed_id
    ))
}

/// Stores `items` (numbered `from + 1` on) and advances the feed's position from `from`
/// to the last of them, in `conn`'s transaction; refused (nothing written) unless the
/// feed is still at `from` under this stream's epoch and open.
pub async fn append_feed(
    conn: &mut PgConnection,
    feed: &OpenFeed,
    from: u64,
    items: &[FeedEntry],
) -> Result<(), Error> {
    let seq = |n: u64| i64::try_from(n).map_err(Error::internal);
    let through = from + items.len() as u64;
    let advanced = sqlx::query(
        "UPDATE live_feeds SET committed_seq = $4 \
         WHERE user_id = $1 AND feed_id = $2 AND epoch = $3 AND committed_seq = $5 \
         AND closed_at IS NULL",
    )
    .bind(feed.participation.user_id)
    .bind(feed.feed_id)
    .bind(feed.epoch)
    .bind(seq(through)?)
    .bind(seq(from)?)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if advanced != 1 {
        return Err(superseded(feed));
    }
    let numbered = (from + 1..).zip(items);
    let sentiments: Vec<(u64, &NewSentiment)> = numbered
        .clone()
        .filter_map(|(n, item)| match item {
            FeedEntry::Sentiment(s) => Some((n, s)),
            FeedEntry::Event(_) => None,
        })
        .collect();
    let events: Vec<(u64, &NewEvent)> = numbered
        .filter_map(|(n, item)| match item {
            FeedEntry::Event(e) => Some((n, e)),
            FeedEntry::Sentiment(_) => None,
        })
        .collect();
    copy_items(conn, feed, &sentiments).await?;
    copy_items(conn, feed, &events).await
}

/// Binary COPY of one table's items of an append.
async fn copy_items<T: FeedTable>(
    conn: &mut PgConnection,
    feed: &OpenFeed,
    items: &[(u64, &T)],
) -> Result<(), Error> {
    if items.is_empty() {
        return Ok(());
    }
    let mut rows = CopyEncoder::new(items.len() * 160);
    for (n, item) in items {
        rows.row(5 + T::ITEM_COLUMNS)
            .uuid(Uuid::now_v7())
            .uuid(feed.participation.user_id)
            .uuid(feed.participation.id)
            .uuid(feed.feed_id)
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
    .await?;
    closed.ok_or_else(|| superseded(feed))
}
