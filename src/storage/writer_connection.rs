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
    /// The connection, and when it was opened.
    open: Option<(PgConnection, Instant)>,
}

/// How long a writer waits for a connection to open.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a writer keeps a connection (sqlx's default `max_lifetime`).
const LIFETIME: Duration = Duration::from_secs(30 * 60);

impl WriterConnection {
    pub(super) fn new(options: Arc<PgConnectOptions>) -> Self {
        Self {
            options,
            open: None,
        }
    }

    pub(super) async fn get(&mut self) -> Result<&mut PgConnection, Error> {
        let open = match self.open.take() {
            Some((conn, at)) if at.elapsed() <= LIFETIME => (conn, at),
            aged => {
                if let Some((conn, _)) = aged {
                    let _ = conn.close().await;
                }
                (self.connect().await?, Instant::now())
            }
        };
        Ok(&mut self.open.insert(open).0)
    }

    async fn connect(&self) -> Result<PgConnection, Error> {
        let opened = tokio::time::timeout(CONNECT_WAIT, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| Error::Unavailable(sqlx::Error::PoolTimedOut))?;
        Ok(opened?)
    }

    pub(super) fn drop_broken(&mut self) {
        self.open = None;
    }

    pub(super) async fn close(self) {
        if let Some((conn, _)) = self.open {
            let _ = conn.close().await;
        }
    }
}

/// Tells every call of a batch that the database could not be reached (`error`):
/// UNAVAILABLE, retryable, nothing of the batch stored.
pub(super) fn unavailable<T>(
    replies: impl IntoIterator<Item = oneshot::Sender<Result<T, Error>>>,
    error: &Error,
) {
    let message = error.to_string();
    for reply in replies {
        let io = std::io::Error::other(message.clone());
        let _ = reply.send(Err(Error::Unavailable(sqlx::Error::Io(io))));
    }
}
