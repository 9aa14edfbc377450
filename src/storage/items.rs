//! What a feed table (sentiments, events) is to storage: how its items are copied in a
//! stream, inserted outside one, and read back. The tables themselves are in
//! `sentiments.rs` and `events.rs`.

use std::{collections::HashSet, future::Future};

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use super::copy::CopyEncoder;
use crate::domain::FeedItem;
use crate::error::Error;

/// A feed item type with a table to write it to.
pub trait FeedTable: FeedItem + Clone + PartialEq + Sized {
    /// The binary COPY statement that loads the table inside a stream.
    const COPY_STATEMENT: &'static str;

    /// The binary COPY statement that loads the table from a live feed: the same
    /// columns, with `feed_seq` after `stream_id` (the feed's id).
    const FEED_COPY_STATEMENT: &'static str;

    /// The item's own columns in [`Self::COPY_STATEMENT`], after the four every row
    /// starts with (id, user_id, participation_id, stream_id).
    const ITEM_COLUMNS: i16;

    /// Encodes the item's own columns of its COPY row.
    fn encode_columns(&self, encoder: &mut CopyEncoder) -> Result<(), Error>;

    /// Inserts items outside any stream whose ids no partition holds, each for its own
    /// participation, in one statement: an item is stored when its participation exists
    /// and the item lies inside it; the conflict on the key (id, user, time) leaves out
    /// an item stored already. The participations are also restricted by `id =
    /// ANY(<the array>)`: the generic plan guesses an array parameter's length, and
    /// without that restriction it joined by scanning every participation (5 ms per call
    /// with 26,000 of them, measured; issue 16). The writers run generic plans
    /// (`storage::use_generic_plans`): PostgreSQL's default re-planned this statement at
    /// every execution, 0.36 ms of planning per call with 11 partitions. Returns the
    /// [`Key`] of each item stored; the caller finds out why any other was not.
    fn insert_new<'c>(
        conn: &'c mut PgConnection,
        rows: &'c [&'c Unary<Self>],
    ) -> impl Future<Output = Result<Vec<Key>, Error>> + Send + 'c;

    /// The statement that claims the ids clients chose (`request_id`) for the rows that
    /// would be stored (participation found, item inside it), in the table of those ids,
    /// whose key (user, id) holds whatever the item's time ([`claim_ids`]). Binds the
    /// participations, ids, starts and ends (the item's span) as arrays; returns each
    /// claimed row's participation, id and start.
    const CLAIM_IDS: &'static str;

    /// The query whether a user ($1) has claimed an id ($2) for an item of this table.
    const ID_CLAIMED: &'static str;

    /// The item stored under `id` for `user_id`, with its participation.
    fn stored(
        pool: &PgPool,
        user_id: Uuid,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<(Uuid, Self)>, Error>> + Send;
}

/// An item by its participation, id and time (its start).
pub type Key = (Uuid, Uuid, DateTime<Utc>);

/// Stores unary `rows` of one table: with `keyed` (every id is a client's `request_id`),
/// first claims their ids ([`FeedTable::CLAIM_IDS`]) and inserts the rows claimed, in one
/// transaction; without, the ids are this server's new UUIDv7s, which nothing holds yet,
/// and the rows are inserted at once. Returns the keys of the items stored.
///
/// The claim is what makes a `request_id` unique for its user whatever the item's time:
/// one index, where a look-up of the id in every partition cost one probe per partition
/// (2.6 ms a call with 370 of them, against 0.64 ms for the claim and the insert in a
/// transaction; docs/BENCHMARKS.md, issue 16). One statement with a data-modifying CTE
/// would save the round trips, but Citus documents no such statement across shards.
pub async fn insert_checked<T: FeedTable>(
    conn: &mut PgConnection,
    rows: &[Unary<T>],
    keyed: bool,
) -> Result<HashSet<Key>, Error> {
    let rows: Vec<&Unary<T>> = rows.iter().collect();
    if !keyed {
        return Ok(T::insert_new(conn, &rows).await?.into_iter().collect());
    }
    let mut tx = conn.begin().await?;
    let claimed: HashSet<Key> = claim_ids(&mut tx, &rows).await?.into_iter().collect();
    let rows: Vec<&Unary<T>> = rows
        .into_iter()
        .filter(|row| claimed.contains(&row.key()))
        .collect();
    let stored = if rows.is_empty() {
        Vec::new()
    } else {
        T::insert_new(&mut tx, &rows).await?
    };
    tx.commit().await?;
    Ok(stored.into_iter().collect())
}

/// Claims the ids of `rows` ([`FeedTable::CLAIM_IDS`]): the [`Key`] of each row claimed. A
/// row whose id its user has claimed before, or that an earlier row of `rows` claims, is
/// left out.
async fn claim_ids<T: FeedTable>(
    conn: &mut PgConnection,
    rows: &[&Unary<T>],
) -> Result<Vec<Key>, Error> {
    let participations: Vec<Uuid> = rows.iter().map(|r| r.participation_id).collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let (starts, ends): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) =
        rows.iter().map(|r| r.item.span()).unzip();
    sqlx::query_as(T::CLAIM_IDS)
        .bind(participations)
        .bind(ids)
        .bind(starts)
        .bind(ends)
        .fetch_all(conn)
        .await
        .map_err(Error::from)
}

/// Whether `user_id` has claimed `id` for an item of `T`'s table.
pub async fn id_claimed<T: FeedTable>(
    pool: &PgPool,
    user_id: Uuid,
    id: Uuid,
) -> Result<bool, Error> {
    sqlx::query_scalar(T::ID_CLAIMED)
        .bind(user_id)
        .bind(id)
        .fetch_one(pool)
        .await
        .map_err(Error::from)
}

/// One item recorded by a unary RPC.
#[derive(Debug)]
pub struct Unary<T> {
    pub participation_id: Uuid,
    pub id: Uuid,
    /// Whether the client chose `id` (a `request_id`) rather than this server.
    pub keyed: bool,
    pub item: T,
}

impl<T: FeedItem> Unary<T> {
    /// The row's [`Key`], by which a batch tells which of its rows a statement stored:
    /// rows may share the id (a retry racing its first attempt, a reuse, two users' one
    /// `request_id`); a reuse at another time or by another user has another key.
    pub fn key(&self) -> Key {
        (self.participation_id, self.id, self.item.span().0)
    }
}
