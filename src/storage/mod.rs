//! PostgreSQL access: every query of the service, with errors translated in one place
//! (`errors.rs`, also behind `From<sqlx::Error>`). All statements bind their parameters.

pub mod api_keys;
mod batch;
mod call;
mod copy;
mod copy_out;
mod errors;
mod events;
mod feed_writer;
mod feeds;
mod items;
mod migrations;
mod participations;
mod routes;
mod sentiments;
mod sessions;
mod spool;
mod streams;
mod timeline;
mod users;
mod writer_connection;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Gauged;

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use batch::Batcher;
pub(crate) use call::begin_on;
pub use feeds::{ADVANCE_FEEDS, OpenFeed};
pub use items::FeedTable;
use items::Unary;
pub use migrations::{MIGRATOR, check_migrated, migrate};
pub use participations::Leaving;
pub use spool::{Spool, SpoolSettings, Spooler};
pub(crate) use streams::{
    FeedCopy, StreamClaim, StreamConnection, claim_stream, finish_stream, hold_participation,
};
pub use timeline::{timeline_copy_sql, timeline_literal_sql, timeline_lower_bound, timeline_sql};
pub use writer_connection::IDLE_CHECK;

use crate::domain::{NewEvent, NewSentiment, Participation};
use crate::error::Error;

/// The tables the service reads and writes at run time.
const RUNTIME_TABLES: &[&str] = &[
    "user_external_ids",
    "users",
    "timezones",
    "sessions",
    "participations",
    "ingest_streams",
    "live_feeds",
    "sentiments",
    "events",
    "sentiment_request_ids",
    "event_request_ids",
];

/// Grants `role` the run-time privileges: connect, use the schema, and SELECT, INSERT,
/// UPDATE, DELETE on the service's tables (SELECT on the migration record and the API
/// keys). No DDL, no TRUNCATE, no DROP.
pub async fn grant_runtime_role(pool: &PgPool, role: &str) -> anyhow::Result<()> {
    // Identifiers cannot be bound as parameters: accept only plain ones, then quote.
    let plain = |name: &str| {
        !name.is_empty()
            && name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    anyhow::ensure!(
        plain(role),
        "role must be lower case letters, digits and _: {role:?}"
    );
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        plain(&database),
        "database name {database:?} is not a plain identifier"
    );
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "GRANT CONNECT ON DATABASE \"{database}\" TO \"{role}\""
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("GRANT USAGE ON SCHEMA public TO \"{role}\""))
        .execute(&mut *tx)
        .await?;
    let tables = RUNTIME_TABLES.join(", ");
    sqlx::query(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO \"{role}\""
    ))
    .execute(&mut *tx)
    .await?;
    // The keys are read (and re-read) at run time; `keys create/revoke` run as the owner.
    sqlx::query(&format!(
        "GRANT SELECT ON _sqlx_migrations, api_keys TO \"{role}\""
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The service's handle on the database: the pool, and the writers that group the unary
/// records of each feed table into shared statements.
#[derive(Debug, Clone)]
pub struct Storage {
    pool: PgPool,
    sentiments: Arc<Batcher<NewSentiment>>,
    events: Arc<Batcher<NewEvent>>,
    /// The pool's connections streams may hold at once ([`stream_share`]); the rest stay
    /// for unary calls and the timeline, whatever the stream load.
    stream_slots: Arc<Semaphore>,
    /// The live feeds' group-commit writers (on the streams' share).
    feeds: Arc<feed_writer::FeedWriter>,
    /// Turns of live-feed opens and closes ([`FEED_OPENS`] at once).
    feed_opens: Arc<Semaphore>,
    /// The live-feed opens' and closes' connections ([`FEED_OPENS`]), outside `pool`
    /// (the feed writers keep theirs, [`FEED_WRITERS`]).
    feed_pool: PgPool,
    /// The users of the participations this server has joined or found.
    routes: Arc<routes::Routes>,
}

/// Of a pool of `connections`, how many streams may hold at once: all but a quarter
/// (at least one) kept for everything else, and at least one.
pub fn stream_share(connections: u32) -> usize {
    let reserved = (connections / 4).max(1);
    usize::try_from(connections.saturating_sub(reserved).max(1)).unwrap_or(1)
}

/// Writer tasks of the live feeds, each with a connection of its own: a few group commits
/// in flight keep up with thousands of feeds on two cores (docs/BENCHMARKS.md).
const FEED_WRITERS: u32 = 3;

/// Live-feed opens and closes at once (each one or two short statements): thousands of
/// feeds reconnecting or ending together wait their turn.
const FEED_OPENS: u32 = 2;

/// The live feeds' connections, outside the pool: the writers' and the opens'. However
/// many feeds are open, they use no more (`app::pool_options` leaves them out of the
/// pool, so that `--max-connections` stays the total).
pub const FEED_CONNECTIONS: u32 = FEED_WRITERS + FEED_OPENS;

/// Writers per unary table: one batch is written at a time, the second only beside a
/// stalled one (`batch`).
const UNARY_WRITERS: usize = 2;

/// The unary writers' connections, outside the pool: one per writer (one batch of each
/// table in flight, one beside a stalled batch), each kept between batches. So few that
/// each has the batch statement prepared and planned: through the pool, whose idle
/// connections are handed out in turn, a batch found a connection without the plan after
/// any invalidation, and planning it (2-4 ms with 11 partitions) held up every call of
/// the batch; with 58 connections open, the unary records at 64 calls in flight lost a
/// third of their speed. Held rather than taken from a pool of their own: sqlx tests a
/// pooled connection with a round trip each time it is given back
/// (docs/decisions/0006-writers-keep-their-own-connections.md).
pub const UNARY_CONNECTIONS: u32 = 2 * UNARY_WRITERS as u32;

/// The connections the service keeps beside its pool: the health probe's, the live
/// feeds' and the unary writers' (`app::pool_options` gives the pool the rest).
pub const OWN_CONNECTIONS: u32 = 1 + FEED_CONNECTIONS + UNARY_CONNECTIONS;

/// A stream's turn to hold one of the pool's connections, until dropped.
pub struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    _counted: Gauged,
}

/// How long a stream waiting for a connection is told to wait before retrying.
const STREAM_SLOT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the database a trivial query over a connection of its own, outside the pool: a
/// pool busy with calls is load, not an outage. The connection is kept between probes and
/// opened again after a failure.
pub struct HealthProbe {
    options: Arc<sqlx::postgres::PgConnectOptions>,
    conn: Option<sqlx::PgConnection>,
}

impl HealthProbe {
    /// Whether the database answers now.
    pub async fn check(&mut self) -> Result<(), Error> {
        use sqlx::Connection;
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self
                .conn
                .insert(sqlx::PgConnection::connect_with(&self.options).await?),
        };
        let answered = sqlx::query("SELECT 1").execute(conn).await;
        if answered.is_err() {
            self.conn = None;
        }
        answered?;
        Ok(())
    }

    /// Drops the connection (after a probe that took too long).
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// A pool of `size` connections beside `pool`, to the same database, connected when first
/// used.
fn side_pool(pool: &PgPool, size: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .test_before_acquire(false)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// A feed table with a group-commit writer in [`Storage`].
pub trait Batched: FeedTable {
    fn batcher(storage: &Storage) -> &Batcher<Self>;
}

impl Batched for NewSentiment {
    fn batcher(storage: &Storage) -> &Batcher<Self> {
        &storage.sentiments
    }
}

impl Batched for NewEvent {
    fn batcher(storage: &Storage) -> &Batcher<Self> {
        &storage.events
    }
}

impl Storage {
    /// Wraps `pool` and starts the unary and live-feed writers, on connections of their
    /// own beside the pool ([`UNARY_CONNECTIONS`], [`FEED_CONNECTIONS`]). Needs a tokio
    /// runtime.
    pub fn new(pool: PgPool) -> Self {
        let connections = pool.options().get_max_connections();
        let stream_slots = Arc::new(Semaphore::new(stream_share(connections)));
        // Thousands of feeds, or of unary calls, cost the database no more than these
        // connections (and `--max-connections` counts them).
        let options = pool.connect_options();
        Self {
            sentiments: Arc::new(Batcher::spawn(&options, UNARY_WRITERS)),
            events: Arc::new(Batcher::spawn(&options, UNARY_WRITERS)),
            feeds: Arc::new(feed_writer::FeedWriter::spawn(
                &options,
                FEED_WRITERS as usize,
            )),
            feed_pool: side_pool(&pool, FEED_OPENS),
            routes: Arc::default(),
            stream_slots,
            feed_opens: Arc::new(Semaphore::new(FEED_OPENS as usize)),
            pool,
        }
    }

    /// A turn for a stream to hold a connection, waiting up to `wait` for one (the stream
    /// reads no further meanwhile, so HTTP/2 flow control holds its client back). Past
    /// `wait`: RESOURCE_EXHAUSTED with RetryInfo, nothing stored.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn stream_slot(&self, wait: std::time::Duration) -> Result<StreamSlot, Error> {
        let slots = Arc::clone(&self.stream_slots);
        let waiting = Gauged::up(crate::metrics::STREAMS_WAITING);
        let acquired = tokio::time::timeout(wait, slots.acquire_owned()).await;
        drop(waiting);
        match acquired {
            Ok(Ok(permit)) => Ok(StreamSlot {
                _permit: permit,
                _counted: Gauged::up(crate::metrics::STREAM_CONNECTIONS),
            }),
            Ok(Err(closed)) => Err(Error::internal(closed)),
            Err(_) => Err(Error::ResourceExhausted {
                message: "every connection the server gives streams is in use; nothing was \
                          stored, retry after the delay in RetryInfo"
                    .to_owned(),
                retry_after: Some(STREAM_SLOT_RETRY),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Opens (or takes over) a live feed of `participation_id` for a new stream; `None`
    /// when the participation does not exist. A few opens run at once (thousands of
    /// feeds reconnecting must not take the pool), the rest wait their turn.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn open_feed(
        &self,
        participation_id: Uuid,
        feed_id: Uuid,
    ) -> Result<Option<OpenFeed>, Error> {
        let _turn = self.feed_opens.acquire().await.map_err(Error::internal)?;
        let Some(participation) =
            participations::participation(&self.feed_pool, &self.routes, participation_id).await?
        else {
            return Ok(None);
        };
        feeds::open_feed(&self.feed_pool, &participation, feed_id)
            .await
            .map(Some)
    }

    /// Stores an append of a live feed and advances its position from `from`, in a
    /// transaction shared with other feeds' appends; returns once committed.
    pub fn append_feed(
        &self,
        feed: &OpenFeed,
        from: u64,
        items: Vec<crate::domain::FeedEntry>,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + 'static {
        let writers = Arc::clone(&self.feeds);
        let append = feeds::Append {
            user_id: feed.participation.user_id,
            feed_id: feed.feed_id,
            participation_id: feed.participation.id,
            epoch: feed.epoch,
            from,
            items,
        };
        async move { writers.append(append).await }
    }

    /// Closes a live feed at `final_seq`.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn close_feed(
        &self,
        feed: &OpenFeed,
        final_seq: u64,
    ) -> Result<chrono::DateTime<chrono::Utc>, Error> {
        let _turn = self.feed_opens.acquire().await.map_err(Error::internal)?;
        feeds::close_feed(&self.feed_pool, feed, final_seq).await
    }

    /// A probe of whether the database answers, over a connection of its own.
    pub fn health_probe(&self) -> HealthProbe {
        HealthProbe {
            options: self.pool.connect_options(),
            conn: None,
        }
    }

    /// Opens a transaction bounded by the current call's deadline.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, Error> {
        call::begin(&self.pool).await
    }

    /// Records one feed item outside any stream (the unary record RPCs); `false` when the
    /// participation is missing, the item lies outside it, or the id is taken (`keyed`:
    /// the client chose `id`, and its user claimed it before).
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn insert_feed_item<T: Batched>(
        &self,
        participation_id: Uuid,
        id: Uuid,
        keyed: bool,
        item: &T,
    ) -> Result<bool, Error> {
        let Some(user_id) = self.user_of(participation_id).await? else {
            return Ok(false);
        };
        let row = Unary {
            participation_id,
            user_id,
            id,
            keyed,
            item: item.clone(),
        };
        T::batcher(self).insert(row).await
    }

    /// The user of participation `id`: from this server's routes, or looked up (and then
    /// known); `None` when the participation does not exist.
    async fn user_of(&self, id: Uuid) -> Result<Option<Uuid>, Error> {
        if let Some(user) = self.routes.user_of(id) {
            return Ok(Some(user));
        }
        Ok(participations::by_id(&self.pool, &self.routes, id)
            .await?
            .map(|found| found.user_id))
    }

    /// The item of `T` stored under `id` for `participation`'s user at `item`'s time (its
    /// start), if any.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn feed_item<T: FeedTable>(
        &self,
        participation: &Participation,
        id: Uuid,
        item: &T,
    ) -> Result<Option<T>, Error> {
        T::stored(&self.pool, participation.user_id, id, item.span().0).await
    }

    /// The claim the user of `participation` holds on `id` (a `request_id`) for an item of
    /// `T`: the participation it was claimed for, and the item unless the retention
    /// dropped it ([`items::claim`]).
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn feed_claim<T: FeedTable>(
        &self,
        participation: &Participation,
        id: Uuid,
    ) -> Result<Option<(Uuid, Option<T>)>, Error> {
        items::claim::<T>(&self.pool, participation.user_id, id).await
    }
}
