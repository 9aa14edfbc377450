//! A client stream's transaction: its claim of the stream id, the binary COPY of its
//! items, and its receipt.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, pool::PoolConnection, postgres::PgCopyIn};
use uuid::Uuid;

use super::{
    copy::{HEADER, TRAILER},
    items::FeedTable,
};
use crate::domain::{Participation, Receipt};
use crate::error::Error;

/// A binary COPY in progress inside a stream's transaction: the rows come encoded from
/// the stream's spool ([`super::spool::Spool`]).
pub struct FeedCopy<'c> {
    copy: PgCopyIn<&'c mut PgConnection>,
}

impl<'c> FeedCopy<'c> {
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn begin<T: FeedTable>(conn: &'c mut PgConnection) -> Result<Self, Error> {
        let mut copy = conn.copy_in_raw(T::COPY_STATEMENT).await?;
        copy.send(&HEADER[..]).await?;
        Ok(Self { copy })
    }

    /// Sends encoded rows.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn send(&mut self, rows: &[u8]) -> Result<(), Error> {
        if !rows.is_empty() {
            self.copy.send(rows).await?;
        }
        Ok(())
    }

    /// Ends the COPY (the database checks its constraints here); returns the rows stored.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn finish(mut self) -> Result<u64, Error> {
        self.copy.send(&TRAILER[..]).await?;
        Ok(self.copy.finish().await?)
    }

    /// Abandons the COPY (the transaction then rolls back); `true` when the connection
    /// is usable afterwards.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn abort(self, reason: &str) -> bool {
        match self.copy.abort(reason).await {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%error, "aborting a COPY failed; the connection will be discarded");
                false
            }
        }
    }
}

/// The pooled connection of one stream's transaction. A stream whose call is dropped
/// mid-way (the client reset it) abandons its COPY where it stood, and a connection in
/// that state is not known to be clean: unless the stream ended through a commit or a
/// completed abort ([`StreamConnection::ended_cleanly`]), the connection is closed
/// instead of going back to the pool, where it could fail the next call that drew it.
pub struct StreamConnection {
    conn: Option<PoolConnection<Postgres>>,
    clean: bool,
}

impl StreamConnection {
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn acquire(pool: &PgPool) -> Result<Self, Error> {
        Ok(Self {
            conn: Some(pool.acquire().await?),
            clean: false,
        })
    }

    pub fn conn(&mut self) -> Result<&mut PgConnection, Error> {
        self.conn
            .as_deref_mut()
            .ok_or_else(|| Error::internal(anyhow::anyhow!("the stream's connection is gone")))
    }

    /// The stream's transaction ended through a commit, or a rollback after a completed
    /// abort of its COPY: the connection may serve others.
    pub fn ended_cleanly(&mut self) {
        self.clean = true;
    }
}

impl Drop for StreamConnection {
    fn drop(&mut self) {
        if let (false, Some(conn)) = (self.clean, self.conn.as_mut()) {
            conn.close_on_drop();
        }
    }
}

/// What claiming a stream id found.
#[derive(Debug)]
pub enum StreamClaim {
    /// The id is new: this transaction owns it until it commits or rolls back; the
    /// commit time it recorded, when the claim recorded the stream complete.
    New { committed_at: Option<DateTime<Utc>> },
    /// A stream with this id committed before.
    Committed {
        participation_id: Uuid,
        kind: String,
        receipt: Receipt,
        /// The digest of its items ([`super::spool::Spool::digest`]); none for streams committed before
        /// migration 0005.
        digest: Option<Vec<u8>>,
    },
}

#[derive(sqlx::FromRow)]
struct StreamRow {
    participation_id: Uuid,
    kind: String,
    items_stored: i64,
    committed_at: Option<DateTime<Utc>>,
    items_digest: Option<Vec<u8>>,
}

/// Holds `participation` for the rest of the stream's transaction (`FOR SHARE`: a leave,
/// which locks it `FOR UPDATE`, waits for the stream's commit, and the stream waits for a
/// leave under way) and returns when it ended as it stands now: the stream's items were
/// checked against the participation as it was when the stream began, and a leave may
/// have come since. `None` when the participation is gone.
pub async fn hold_participation(
    conn: &mut PgConnection,
    participation: &Participation,
) -> Result<Option<Option<DateTime<Utc>>>, Error> {
    sqlx::query_scalar(
        "SELECT disconnected_at FROM participations WHERE user_id = $1 AND id = $2 FOR SHARE",
    )
    .bind(participation.user_id)
    .bind(participation.id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(Error::from)
}

/// Records `stream_id` inside the stream's transaction. A concurrent claim of the same id
/// waits for this transaction, then finds the committed stream (or claims it, if this
/// one rolled back): a stream id commits once. A stream whose items are all in already
/// (`finished`: their count and digest) is recorded complete in the same statement; any
/// other is completed by [`finish_stream`].
pub async fn claim_stream(
    conn: &mut PgConnection,
    participation: &Participation,
    stream_id: Uuid,
    kind: &str,
    finished: Option<(u64, &[u8])>,
) -> Result<StreamClaim, Error> {
    let (items, digest) = finished.unzip();
    let items = items
        .map(i64::try_from)
        .transpose()
        .map_err(Error::internal)?;
    // statement_timestamp(): see finish_stream.
    let inserted: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "INSERT INTO ingest_streams \
             (user_id, stream_id, participation_id, kind, items_stored, items_digest, committed_at) \
         VALUES ($1, $2, $3, $4, coalesce($5, 0), $6, \
                 CASE WHEN $5 IS NOT NULL THEN statement_timestamp() END) \
         ON CONFLICT (user_id, stream_id) DO NOTHING RETURNING committed_at",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .bind(participation.id)
    .bind(kind)
    .bind(items)
    .bind(digest)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(committed_at) = inserted {
        return Ok(StreamClaim::New { committed_at });
    }
    let row: Option<StreamRow> = sqlx::query_as(
        "SELECT participation_id, kind, items_stored, committed_at, items_digest \
         FROM ingest_streams WHERE user_id = $1 AND stream_id = $2",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .fetch_optional(&mut *conn)
    .await?;
    // The claim found the record, and records are deleted only with their participation,
    // which this call holds: anything else here is a broken invariant, not a client error.
    let broken = |what: &str| {
        Error::internal(anyhow::anyhow!(
            "stream record {stream_id}: {what} after its claim conflicted"
        ))
    };
    let row = row.ok_or_else(|| broken("not found"))?;
    Ok(StreamClaim::Committed {
        participation_id: row.participation_id,
        kind: row.kind,
        receipt: Receipt {
            stream_id,
            items_stored: u64::try_from(row.items_stored).map_err(|_| broken("negative count"))?,
            committed_at: row.committed_at.ok_or_else(|| broken("no commit time"))?,
            replayed: true,
        },
        digest: row.items_digest,
    })
}

/// Completes a claimed stream's record just before its transaction commits.
pub async fn finish_stream(
    conn: &mut PgConnection,
    participation: &Participation,
    stream_id: Uuid,
    items_stored: u64,
    digest: &[u8],
) -> Result<DateTime<Utc>, Error> {
    let items = i64::try_from(items_stored).map_err(Error::internal)?;
    sqlx::query_scalar(
        // statement_timestamp(), not clock_timestamp(): Citus refuses VOLATILE functions in
        // an UPDATE of a distributed table; a STABLE one without column arguments it
        // evaluates once, on the coordinator. This is the stream's last statement before
        // COMMIT, so the two differ by microseconds.
        "UPDATE ingest_streams SET items_stored = $3, items_digest = $4, \
             committed_at = statement_timestamp() \
         WHERE user_id = $1 AND stream_id = $2 RETURNING committed_at",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .bind(items)
    .bind(digest)
    .fetch_one(conn)
    .await
    .map_err(Error::from)
}
