//! What a feed table (sentiments, events) is to storage: how its items are copied in a
//! stream, inserted outside one, and read back. The tables themselves are in
//! `sentiments.rs` and `events.rs`.

use std::future::Future;

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

    /// Inserts items outside any stream, each for its own participation, in one
    /// statement: an item is stored when its participation exists, the item lies inside
    /// it, and its id is not taken. The participations are also restricted by
    /// `id = ANY(<the array>)`: the generic plan guesses an array parameter's length, and
    /// without that restriction it joined by scanning every participation (5 ms per call
    /// with 26,000 of them, measured; issue 16). The writers run generic plans
    /// (`storage::use_generic_plans`): PostgreSQL's default re-planned this statement at
    /// every execution, 0.36 ms of planning per call with 11 partitions. Returns the ids stored; the caller finds out why any other was not.
    ///
    /// With `keyed` (every row's id is a client's `request_id`), the id is also looked up
    /// in every partition, since the key includes the timestamp and the same id may have
    /// been stored at another time (LATERAL with LIMIT 1, so that the look-up always
    /// probes the key by both id and user). That look-up costs one index probe per
    /// partition: 0.42 ms per one-row statement with 10 partitions, 2.5 ms with 370 (a
    /// year of daily ones), against 0.34-0.39 ms without it at either count. Without `keyed` the ids
    /// are this server's new UUIDv7s, which no partition can hold yet, and the conflict
    /// on the key is the only check.
    fn insert_checked<'c>(
        conn: &'c mut PgConnection,
        rows: &'c [Unary<Self>],
        keyed: bool,
    ) -> impl Future<Output = Result<Vec<Uuid>, Error>> + Send + 'c;

    /// The item stored under `id` for `user_id`, with its participation.
    fn stored(
        pool: &PgPool,
        user_id: Uuid,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<(Uuid, Self)>, Error>> + Send;
}

/// One item recorded by a unary RPC.
#[derive(Debug, PartialEq)]
pub struct Unary<T> {
    pub participation_id: Uuid,
    pub id: Uuid,
    /// Whether the client chose `id` (a `request_id`) rather than this server.
    pub keyed: bool,
    pub item: T,
}
