//! Participations: a user's presence in a session.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Storage, routes::Routes};
use crate::domain::{NewParticipation, Participation, TimezoneCode, Usage};
use crate::error::Error;

#[derive(sqlx::FromRow)]
struct ParticipationRow {
    id: Uuid,
    user_id: Uuid,
    session_id: Uuid,
    timezone_code: String,
    connected_at: DateTime<Utc>,
    disconnected_at: Option<DateTime<Utc>>,
    talked_time_us: Option<i64>,
    microphone_used: Option<bool>,
    speaker_used: Option<bool>,
}

const PARTICIPATION_COLUMNS: &str = "id, user_id, session_id, timezone_code, connected_at, \
     disconnected_at, talked_time_us, microphone_used, speaker_used";

impl From<ParticipationRow> for Participation {
    fn from(row: ParticipationRow) -> Self {
        let usage = match (row.talked_time_us, row.microphone_used, row.speaker_used) {
            (Some(talked_us), Some(microphone_used), Some(speaker_used)) => Some(Usage {
                talked_time: TimeDelta::microseconds(talked_us),
                microphone_used,
                speaker_used,
            }),
            _ => None,
        };
        Self {
            id: row.id,
            user_id: row.user_id,
            session_id: row.session_id,
            timezone_code: TimezoneCode::from_stored(row.timezone_code),
            connected_at: row.connected_at,
            disconnected_at: row.disconnected_at,
            usage,
        }
    }
}

impl Storage {
    /// Inserts a participation if its session takes a connection at its time (started,
    /// and not ended before it). `None` when nothing was inserted: the session is missing
    /// or refuses the time, or this user has a participation with this id already; the
    /// caller finds out which.
    ///
    /// One statement, which holds the session's row until the participation is committed,
    /// so that an EndSession waits for this join and then sees its connection (or ended
    /// the session first, and this join sees that): `raised` moves the session's latest
    /// connection up to this one (the schema refuses an end before it), taking the row
    /// for itself; when it is there already (joins at one time, or out of order), `held`
    /// only shares the row, so that such joins do not queue behind each other
    /// (docs/decisions/0003-sessions-distributed-by-id.md). A row `raised` updated is not
    /// locked again by `held` (PostgreSQL skips a row the statement itself modified; on
    /// Citus each runs as a statement of its own, and UNION keeps the one id). On Citus
    /// the session and the participation live on different shards, and this statement
    /// is the participations -> sessions rule (docs/GUARANTEES.md, "On Citus").
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn insert_participation(
        &self,
        id: Uuid,
        participation: &NewParticipation,
    ) -> Result<Option<Participation>, Error> {
        let row: Option<ParticipationRow> = sqlx::query_as(&format!(
            "WITH raised AS ( \
               UPDATE sessions SET last_connected_at = $5 \
               WHERE id = $3 AND started_at <= $5 AND (ended_at IS NULL OR $5 <= ended_at) \
                 AND (last_connected_at IS NULL OR last_connected_at < $5) \
               RETURNING id), \
             held AS ( \
               SELECT id FROM sessions \
               WHERE id = $3 AND started_at <= $5 AND (ended_at IS NULL OR $5 <= ended_at) \
               FOR SHARE) \
             INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
             SELECT $1::uuid, $2::uuid, s.id, $4::text, $5::timestamptz \
             FROM (SELECT id FROM raised UNION SELECT id FROM held) s \
             ON CONFLICT (user_id, id) DO NOTHING \
             RETURNING {PARTICIPATION_COLUMNS}"
        ))
        .bind(id)
        .bind(participation.user_id)
        .bind(participation.session_id)
        .bind(participation.timezone_code.as_str())
        .bind(participation.connected_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::from(e).at_commit())?;
        let participation = row.map(Participation::from);
        if let Some(joined) = &participation {
            self.routes.learn(joined.id, joined.user_id);
        }
        Ok(participation)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn get_participation(&self, id: Uuid) -> Result<Option<Participation>, Error> {
        participation(&self.pool, &self.routes, id).await
    }

    /// Closes an open participation at `disconnected_at`, unless it holds items that end
    /// after that time (a participation spans its items: the unary, stream and feed
    /// writes check each item against it, and a leave must not undo that afterwards).
    ///
    /// The participation is locked first (`FOR UPDATE`): that waits for the writes whose
    /// items already hold it (an item's foreign-key check keeps the row share-locked
    /// until its transaction ends) and holds off the ones that come after, until the
    /// leave is committed; the items are then read afresh. A write that checked its span
    /// before the lock and takes its foreign-key lock after it can still commit an item
    /// past the leave (docs/GUARANTEES.md, "A participation spans its items").
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn leave_participation(
        &self,
        participation: &Participation,
        disconnected_at: DateTime<Utc>,
        usage: &Usage,
    ) -> Result<Leaving, Error> {
        let talked_us = usage.talked_time.num_microseconds().ok_or_else(|| {
            Error::invalid(
                "talked_time",
                "must not be longer than the participation lasted",
            )
        })?;
        let mut tx = self.begin().await?;
        let open: Option<bool> = sqlx::query_scalar(
            "SELECT disconnected_at IS NULL FROM participations \
             WHERE user_id = $1 AND id = $2 FOR UPDATE",
        )
        .bind(participation.user_id)
        .bind(participation.id)
        .fetch_optional(&mut *tx)
        .await?;
        if open != Some(true) {
            return Ok(Leaving::Closed);
        }
        // Planned for this call (not prepared), so that only the partitions from the
        // participation's start on are read and locked.
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT greatest( \
               (SELECT max(ended_at) FROM sentiments \
                WHERE user_id = $1 AND participation_id = $2 AND started_at >= $3), \
               (SELECT max(occurred_at) FROM events \
                WHERE user_id = $1 AND participation_id = $2 AND occurred_at >= $3))",
        )
        .bind(participation.user_id)
        .bind(participation.id)
        .bind(participation.connected_at)
        .persistent(false)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(last) = last.filter(|last| *last > disconnected_at) {
            return Ok(Leaving::ItemsUntil(last));
        }
        let row: ParticipationRow = sqlx::query_as(&format!(
            "UPDATE participations SET disconnected_at = $3, talked_time_us = $4, \
             microphone_used = $5, speaker_used = $6 \
             WHERE user_id = $1 AND id = $2 \
             RETURNING {PARTICIPATION_COLUMNS}"
        ))
        .bind(participation.user_id)
        .bind(participation.id)
        .bind(disconnected_at)
        .bind(talked_us)
        .bind(usage.microphone_used)
        .bind(usage.speaker_used)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await.map_err(|e| Error::from(e).at_commit())?;
        Ok(Leaving::Left(row.into()))
    }
}

/// What became of a leave.
#[derive(Debug)]
pub enum Leaving {
    /// Closed as asked.
    Left(Participation),
    /// It was closed already, or is gone.
    Closed,
    /// Items of it end after the time asked: the latest end. Nothing changed.
    ItemsUntil(DateTime<Utc>),
}

/// The participation `id`, read over `pool`: from its user's rows when `routes` knows the
/// user (on Citus, one shard), otherwise by its id alone (on Citus, every shard), after
/// which the route is known.
pub(super) async fn participation(
    pool: &PgPool,
    routes: &Routes,
    id: Uuid,
) -> Result<Option<Participation>, Error> {
    if let Some(user_id) = routes.user_of(id) {
        let row: Option<ParticipationRow> = sqlx::query_as(&format!(
            "SELECT {PARTICIPATION_COLUMNS} FROM participations WHERE user_id = $1 AND id = $2"
        ))
        .bind(user_id)
        .bind(id)
        .fetch_optional(pool)
        .await?;
        if let Some(row) = row {
            return Ok(Some(row.into()));
        }
        // Gone with its user, or its id taken since by another user's participation.
        routes.forget(id);
    }
    by_id(pool, routes, id).await
}

/// The participation `id`, looked up by its id alone (on Citus, on every shard); its
/// route is then known.
pub(super) async fn by_id(
    pool: &PgPool,
    routes: &Routes,
    id: Uuid,
) -> Result<Option<Participation>, Error> {
    let row: Option<ParticipationRow> = sqlx::query_as(&format!(
        "SELECT {PARTICIPATION_COLUMNS} FROM participations WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let participation = row.map(Participation::from);
    if let Some(found) = &participation {
        routes.learn(found.id, found.user_id);
    }
    Ok(participation)
}
