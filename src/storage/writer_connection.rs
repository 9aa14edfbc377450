//! The connection a group-commit writer (unary records, `batch`; live feeds,
//! `feed_writer`) keeps for itself, and how a batch that cannot reach the database is
//! answered.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use tokio::sync::oneshot;

use crate::error::Error;

/// A writer's connection of its own, opened when first needed and kept between batches;
/// opened again after one that failed to reach the database, and after [`LIFETIME`] (as
/// sqlx's pools recycle theirs, so that a failover or a new coordinator is picked up).
/// Not a pool's: sqlx's pool sends every connection it takes back a round trip (a
/// `Sync`) to test it, a task and a round trip per batch that the writer, which holds its
/// connection, does not need.
pub(super) struct WriterConnection {
    options: Arc<PgConnectOptions>,
    /// The connection, when it was opened, and when it was last handed out.
    open: Option<(PgConnection, Instant, Instant)>,
}

/// How long a writer waits for a connection to open.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a writer keeps a connection (sqlx's default `max_lifetime`).
const LIFETIME: Duration = Duration::from_secs(30 * 60);
/// A connection idle for longer is tested (a round trip) before it takes a batch: a
/// database restarted meanwhile has closed it, and the batch would fail on it although
/// the database is back. Under load a writer's connection is never idle that long.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

impl WriterConnection {
    pub(super) fn new(options: Arc<PgConnectOptions>) -> Self {
        Self {
            options,
            open: None,
        }
    }

    pub(super) async fn get(&mut self) -> Result<&mut PgConnection, Error> {
        let kept = match self.open.take() {
            Some((conn, opened, used)) if opened.elapsed() <= LIFETIME => {
                alive(conn, used).await.map(|conn| (conn, opened))
            }
            Some((conn, _, _)) => {
                let _ = conn.close().await;
                None
            }
            None => None,
        };
        let (conn, opened) = match kept {
            Some(kept) => kept,
            None => (self.connect().await?, Instant::now()),
        };
        Ok(&mut self.open.insert((conn, opened, Instant::now())).0)
    }

    async fn connect(&self) -> Result<PgConnection, Error> {
        let opened = tokio::time::timeout(CONNECT_WAIT, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| Error::Unavailable(sqlx::Error::PoolTimedOut))?;
        Ok(opened?)
    }

    /// What the connection is opened with.
    pub(super) fn options(&self) -> Arc<PgConnectOptions> {
        Arc::clone(&self.options)
    }

    pub(super) fn drop_broken(&mut self) {
        self.open = None;
    }

    pub(super) async fn close(self) {
        if let Some((conn, _, _)) = self.open {
            let _ = conn.close().await;
        }
    }
}

/// `conn`, unless it was idle for longer than [`IDLE_CHECK`] and no longer answers.
async fn alive(mut conn: PgConnection, used: Instant) -> Option<PgConnection> {
    if used.elapsed() <= IDLE_CHECK {
        return Some(conn);
    }
    match conn.ping().await {
        Ok(()) => Some(conn),
        Err(error) => {
            tracing::info!(%error, "a writer's idle connection is gone; opening another");
            None
        }
    }
}

/// Tells every call of a batch that the database could not be reached (`error`):
/// UNAVAILABLE, retryable. With `unknown`, the batch was sent and may have been committed:
/// the calls hear that the outcome is unknown, and how to retry; without, nothing of the
/// batch was stored.
pub(super) fn unavailable<T>(
    replies: impl IntoIterator<Item = oneshot::Sender<Result<T, Error>>>,
    error: &dyn std::fmt::Display,
    unknown: Option<&'static str>,
) {
    let message = error.to_string();
    for reply in replies {
        let cause = sqlx::Error::Io(std::io::Error::other(message.clone()));
        let _ = reply.send(Err(match unknown {
            Some(retry) => Error::OutcomeUnknown { retry, cause },
            None => Error::Unavailable(cause),
        }));
    }
}
