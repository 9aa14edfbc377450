//! A client stream's transaction: its claim of the stream id, the binary COPY of its
//! items, and its receipt.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, postgres::PgCopyIn};
use uuid::Uuid;

use super::{copy::CopyEncoder, items::FeedTable};
use crate::domain::{Participation, Receipt};
use crate::error::Error;

/// Bytes of COPY data buffered before they are sent: bounds a stream's memory.
pub const COPY_SEND_BYTES: usize = 256 * 1024;

/// A binary COPY in progress inside a stream's transaction.
pub struct FeedCopy<'c> {
    copy: PgCopyIn<&'c mut PgConnection>,
    encoder: CopyEncoder,
}

impl<'c> FeedCopy<'c> {
    pub async fn begin<T: FeedTable>(conn: &'c mut PgConnection) -> Result<Self, Error> {
        let copy = conn.copy_in_raw(T::COPY_STATEMENT).await?;
        Ok(Self {
            copy,
            encoder: CopyEncoder::new(COPY_SEND_BYTES + 4096),
        })
    }

    /// Encodes one item; sends the buffer to the server once it is full.
    pub async fn push<T: FeedTable>(
        &mut self,
        id: Uuid,
        participation: &Participation,
        stream_id: Uuid,
        item: &T,
    ) -> Result<(), Error> {
        self.encoder
            .row(4 + T::ITEM_COLUMNS)
            .uuid(id)
            .uuid(participation.user_id)
            .uuid(participation.id)
            .uuid(stream_id);
        item.encode_columns(&mut self.encoder)?;
        if self.encoder.len() >= COPY_SEND_BYTES {
            self.copy.send(self.encoder.take()).await?;
        }
        Ok(())
    }

    /// Sends the rest and ends the COPY; the database checks its constraints here.
    pub async fn finish(mut self) -> Result<u64, Error> {
        let rest = std::mem::replace(&mut self.encoder, CopyEncoder::new(0)).finish();
        self.copy.send(rest).await?;
        self.copy.finish().await.map_err(Error::from)
    }

    /// Abandons the COPY, leaving the connection usable (the transaction then rolls back).
    pub async fn abort(self, reason: &str) {
        if let Err(error) = self.copy.abort(reason).await {
            tracing::debug!(%error, "aborting a COPY failed; the connection will be discarded");
        }
    }
}

/// What claiming a stream id found.
#[derive(Debug)]
pub enum StreamClaim {
    /// The id is new: this transaction owns it until it commits or rolls back.
    New,
    /// A stream with this id committed before.
    Committed {
        participation_id: Uuid,
        kind: String,
        receipt: Receipt,
    },
}

type StreamRow = (Uuid, String, i64, Option<DateTime<Utc>>);

/// Records `stream_id` inside the stream's transaction. A concurrent claim of the same id
/// waits for this transaction, then finds the committed stream (or claims it, if this
/// one rolled back): a stream id commits once.
pub async fn claim_stream(
    conn: &mut PgConnection,
    participation: &Participation,
    stream_id: Uuid,
    kind: &str,
) -> Result<StreamClaim, Error> {
    let inserted = sqlx::query(
        "INSERT INTO ingest_streams (user_id, stream_id, participation_id, kind) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, stream_id) DO NOTHING",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .bind(participation.id)
    .bind(kind)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(StreamClaim::New);
    }
    let row: Option<StreamRow> = sqlx::query_as(
        "SELECT participation_id, kind, items_stored, committed_at FROM ingest_streams \
         WHERE user_id = $1 AND stream_id = $2",
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
    let (participation_id, kind, items_stored, committed_at) =
        row.ok_or_else(|| broken("not found"))?;
    Ok(StreamClaim::Committed {
        participation_id,
        kind,
        receipt: Receipt {
            stream_id,
            items_stored: u64::try_from(items_stored).map_err(|_| broken("negative count"))?,
            committed_at: committed_at.ok_or_else(|| broken("no commit time"))?,
            replayed: true,
        },
    })
}

/// Completes a claimed stream's record just before its transaction commits.
pub async fn finish_stream(
    conn: &mut PgConnection,
    participation: &Participation,
    stream_id: Uuid,
    items_stored: u64,
) -> Result<DateTime<Utc>, Error> {
    let items = i64::try_from(items_stored).map_err(Error::internal)?;
    sqlx::query_scalar(
        // statement_timestamp(), not clock_timestamp(): Citus refuses VOLATILE functions in
        // an UPDATE of a distributed table; a STABLE one without column arguments it
        // evaluates once, on the coordinator. This is the stream's last statement before
        // COMMIT, so the two differ by microseconds.
        "UPDATE ingest_streams SET items_stored = $3, committed_at = statement_timestamp() \
         WHERE user_id = $1 AND stream_id = $2 RETURNING committed_at",
    )
    .bind(participation.user_id)
    .bind(stream_id)
    .bind(items)
    .fetch_one(conn)
    .await
    .map_err(Error::from)
}
