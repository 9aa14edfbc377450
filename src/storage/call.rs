//! Database work tied to the call it serves: it stops when the call's deadline passes or
//! the call is dropped (the client cancelled), instead of running on in PostgreSQL.

use std::future::Future;

use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction, pool::PoolConnection};

use crate::error::Error;

/// Opens a transaction whose statements PostgreSQL stops when the current call's
/// deadline passes (`statement_timeout`, local to the transaction).
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, Error> {
    let mut tx = pool.begin().await?;
    limit_to_deadline(&mut tx).await?;
    Ok(tx)
}

/// [`begin`] on a connection the caller holds.
pub async fn begin_on(conn: &mut PgConnection) -> Result<Transaction<'_, Postgres>, Error> {
    let mut tx = conn.begin().await?;
    limit_to_deadline(&mut tx).await?;
    Ok(tx)
}

async fn limit_to_deadline(tx: &mut PgConnection) -> Result<(), Error> {
    if let Some(left) = crate::deadline::remaining() {
        if left.is_zero() {
            return Err(Error::DeadlineExceeded);
        }
        let millis = left.as_millis().clamp(1, i32::MAX as u128);
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(format!("{millis}ms"))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Runs `work` on `conn`; if the call is dropped before `work` finishes (the client
/// cancelled, or tonic gave up at the deadline), the statement `conn` is running is
/// cancelled (`pg_cancel_backend`, from a connection of its own) rather than left to
/// finish for nobody. The transaction then rolls back as the connection returns to the
/// pool. `conn` must be in a transaction: the cancel reaches the backend only while it is
/// still in that transaction, never a statement of the connection's next user.
pub async fn cancelled_with_call<'c, T, F>(
    pool: &PgPool,
    conn: &'c mut PgConnection,
    work: impl FnOnce(&'c mut PgConnection) -> F,
) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>>,
{
    let (pid, transaction): (i32, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT pg_backend_pid(), now()")
            .fetch_one(&mut *conn)
            .await?;
    let mut guard = CancelOnDrop {
        pool: pool.clone(),
        pid,
        transaction,
        armed: true,
    };
    let outcome = work(conn).await;
    guard.armed = false;
    outcome
}

/// Cancels backend `pid`'s statement when dropped while armed, if the backend is still in
/// the transaction that began at `transaction`.
struct CancelOnDrop {
    pool: PgPool,
    pid: i32,
    transaction: chrono::DateTime<chrono::Utc>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (options, pid, transaction) = (self.pool.connect_options(), self.pid, self.transaction);
        runtime.spawn(async move {
            // A connection of its own: the pool may be busy, and the cancel is urgent.
            let cancelled = async {
                let mut conn = PgConnection::connect_with(&options).await?;
                // Checked and signalled in one statement: by then the connection may have
                // rolled back and gone to another call, whose statement must not stop.
                let cancelled: bool = sqlx::query_scalar(
                    "SELECT coalesce(bool_or(pg_cancel_backend(pid)), false) \
                     FROM pg_stat_activity WHERE pid = $1 AND xact_start = $2",
                )
                .bind(pid)
                .bind(transaction)
                .fetch_one(&mut conn)
                .await?;
                conn.close().await?;
                Ok::<_, sqlx::Error>(cancelled)
            };
            match cancelled.await {
                Ok(cancelled) => {
                    tracing::info!(pid, cancelled, "the call went away: cancelled its statement")
                }
                Err(error) => {
                    tracing::warn!(pid, %error, "the call went away, but cancelling its statement failed")
                }
            }
        });
    }
}

/// The backend of `conn`, for [`cancel_backend`].
pub async fn backend_pid(conn: &mut PgConnection) -> Result<i32, Error> {
    Ok(sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await?)
}

/// Asks PostgreSQL, over a connection of its own (the pool may be busy), to cancel the
/// statement backend `pid` runs.
pub async fn cancel_backend(pool: &PgPool, pid: i32) -> Result<(), sqlx::Error> {
    let mut other = PgConnection::connect_with(&pool.connect_options()).await?;
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .execute(&mut other)
        .await?;
    other.close().await
}

/// Makes `conn`, whose statement was cancelled and has ended, fit to go back to the pool:
/// a cancel that arrived after its statement ended would stop the next one instead, so a
/// ping takes it (a second one then reads the connection's next ReadyForQuery); a
/// connection whose state is still unclear is closed rather than reused.
pub async fn after_cancel(conn: &mut PoolConnection<Postgres>) {
    if conn.ping().await.is_err() && conn.ping().await.is_err() {
        conn.close_on_drop();
    }
}
