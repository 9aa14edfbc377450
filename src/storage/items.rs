//! What a feed table (sentiments, events) is to storage: how its items are copied in a
//! stream, inserted outside one, and read back. The tables themselves are in
//! `sentiments.rs` and `events.rs`.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    future::Future,
};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
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

    /// Inserts items outside any stream whose ids the server made (new UUIDv7s), each for
    /// its own participation, in one statement: an item is stored when its participation
    /// exists and the item lies inside it; the conflict on the key (id, user, time) leaves
    /// out an item stored already. The participations are also restricted by `id =
    /// ANY(<the array>)`: a generic plan guesses an array parameter's length, and
    /// without that restriction it joined by scanning every participation (5 ms per call
    /// with 26,000 of them, measured). The plan is PostgreSQL's default choice, which Citus
    /// needs (docs/decisions/0001-plans-chosen-by-postgresql.md). Binds what
    /// [`FeedTable::insert`] binds; returns the [`Key`] of each item stored.
    const INSERT_NEW: &'static str;

    /// [`Self::INSERT_NEW`] for ids clients chose (`request_id`), in one statement: a
    /// data-modifying CTE first claims each id in the table of those ids, whose key (user,
    /// id) holds whatever the item's time, for the rows that would be stored (participation
    /// found, item inside it); the claimed rows then go in. An id its user claimed before,
    /// or that another row of the statement claims, is not stored.
    const INSERT_CLAIMED: &'static str;

    /// Runs `statement` ([`Self::INSERT_NEW`] or [`Self::INSERT_CLAIMED`]) for `rows`: the
    /// participations, ids and the item's columns bound as arrays. Returns the [`Key`] of
    /// each item stored.
    fn insert<'c>(
        conn: &'c mut PgConnection,
        rows: &'c [&'c Unary<Self>],
        statement: &'static str,
    ) -> impl Future<Output = Result<Vec<Key>, Error>> + Send + 'c;

    /// The query of the claim a user ($1) holds on an id ($2) in this table's ids
    /// chosen by clients: the claiming item's participation and time (its start).
    const CLAIM: &'static str;

    /// The item stored under `id` for `user_id` at `at` (its start), which names its
    /// partition. Not a prepared statement: a plan for its parameters reads and locks
    /// that partition alone, where a generic plan locks every partition when it starts
    /// (PostgreSQL 15; the timeline has the same reason, `storage::timeline`).
    fn stored(
        pool: &PgPool,
        user_id: Uuid,
        id: Uuid,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<Self>, Error>> + Send;
}

/// The three statements of a table's unary records ([`FeedTable::INSERT_NEW`],
/// [`FeedTable::INSERT_CLAIMED`], [`FeedTable::CLAIM`]), the same for both tables, built
/// inside the table's `impl FeedTable` from its own pieces: `$sql` names the table's macro,
/// whose arms give `insert` (the table and its columns), `item` (the item's columns as
/// selected from the rows), `rows` (the rows bound as arrays, `t`), `in_span` (the join
/// to each row's participation, `p`, where the item lies in its span), `ids` (the table
/// of the ids clients chose) and `at` (the item's time, the last column of its key).
// rustfmt dedents the nested call to the `stored` arm; the layout is kept by hand.
#[rustfmt::skip]
macro_rules! unary_statements {
    ($sql:ident) => {
        const INSERT_NEW: &'static str = concat!(
            $sql!(insert),
            "SELECT t.id, p.user_id, p.id, ",
            $sql!(item),
            " ",
            $sql!(rows),
            $sql!(in_span),
            unary_statements!(stored: $sql)
        );

        const INSERT_CLAIMED: &'static str = concat!(
            "WITH claimed AS ( INSERT INTO ",
            $sql!(ids),
            " (user_id, id, participation_id, ",
            $sql!(at),
            ") SELECT p.user_id, t.id, p.id, t.",
            $sql!(at),
            " ",
            $sql!(rows),
            $sql!(in_span),
            "ON CONFLICT (user_id, id) DO NOTHING \
             RETURNING user_id, id, participation_id, ",
            $sql!(at),
            ") ",
            $sql!(insert),
            "SELECT t.id, c.user_id, c.participation_id, ",
            $sql!(item),
            " ",
            $sql!(rows),
            "JOIN claimed c ON c.participation_id = t.participation_id AND c.id = t.id \
             AND c.",
            $sql!(at),
            " = t.",
            $sql!(at),
            " ",
            unary_statements!(stored: $sql)
        );

        const CLAIM: &'static str = concat!(
            "SELECT participation_id, ",
            $sql!(at),
            " FROM ",
            $sql!(ids),
            " WHERE user_id = $1 AND id = $2"
        );
    };
    (stored: $sql:ident) => {
        concat!(
            "ON CONFLICT (id, user_id, ",
            $sql!(at),
            ") DO NOTHING RETURNING participation_id, id, ",
            $sql!(at)
        )
    };
}
pub(super) use unary_statements;

/// An item by its participation, id and time (its start).
pub type Key = (Uuid, Uuid, DateTime<Utc>);

/// Stores unary `rows` of one table in one statement: with `keyed` (every id is a
/// client's `request_id`), [`FeedTable::INSERT_CLAIMED`], which claims the ids and inserts
/// the rows claimed; without, the ids are this server's new UUIDv7s, which nothing holds
/// yet, and [`FeedTable::INSERT_NEW`] inserts them. Returns, for each row, whether it is
/// stored.
///
/// Rows with one [`Key`] (a retry sent beside its first attempt) go in once: the first of
/// them; a later one counts as stored only when it carries the same item, so that a
/// `request_id` reused at the same time for another item is never told it was stored.
///
/// The claim is what makes a `request_id` unique for its user whatever the item's time:
/// one index, where a look-up of the id in every partition cost one probe per partition
/// (2.6 ms a call with 370 of them; docs/decisions/0004-request-ids-claimed-in-a-table.md).
/// Claim and insert are
/// one statement rather than a transaction of two (BEGIN, two INSERTs, COMMIT: three more
/// round trips per batch; 0.61 against 0.38 ms for one call). On Citus a data-modifying
/// CTE runs as its own distributed statement first, its rows passed on to the outer one
/// (push-pull execution), in the same distributed transaction: docs/SCALING.md.
pub async fn insert_checked<T: FeedTable>(
    conn: &mut PgConnection,
    rows: &[Unary<T>],
    keyed: bool,
) -> Result<Vec<bool>, Error> {
    let mut first: HashMap<Key, usize> = HashMap::with_capacity(rows.len());
    let mut unique: Vec<&Unary<T>> = Vec::with_capacity(rows.len());
    for (at, row) in rows.iter().enumerate() {
        if let Entry::Vacant(slot) = first.entry(row.key()) {
            slot.insert(at);
            unique.push(row);
        }
    }
    let statement = if keyed {
        T::INSERT_CLAIMED
    } else {
        T::INSERT_NEW
    };
    let stored: HashSet<Key> = T::insert(conn, &unique, statement)
        .await?
        .into_iter()
        .collect();
    Ok(rows
        .iter()
        .map(|row| {
            let key = row.key();
            stored.contains(&key) && first.get(&key).is_some_and(|&at| rows[at].item == row.item)
        })
        .collect())
}

/// The claim `user_id` holds on `id` (a `request_id`) for an item of `T`'s table: the
/// participation it was claimed for, and the item when it is still stored (the retention
/// drops items, not claims). Two reads of one row each: the claim, then the item in the
/// partition of the claim's time. The item by user and id alone probed every partition
/// and locked them all (1.4 ms with 375 partitions, against 0.35 ms for the two reads;
/// docs/decisions/0004-request-ids-claimed-in-a-table.md).
pub async fn claim<T: FeedTable>(
    pool: &PgPool,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<(Uuid, Option<T>)>, Error> {
    let claim: Option<(Uuid, DateTime<Utc>)> = sqlx::query_as(T::CLAIM)
        .bind(user_id)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    let Some((participation_id, at)) = claim else {
        return Ok(None);
    };
    Ok(Some((
        participation_id,
        T::stored(pool, user_id, id, at).await?,
    )))
}

/// One item recorded by a unary RPC.
#[derive(Debug)]
pub struct Unary<T> {
    pub participation_id: Uuid,
    /// The participation's user, as the server's route has it: the statement reads that
    /// user's participations only (on Citus, that user's shard).
    pub user_id: Uuid,
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
