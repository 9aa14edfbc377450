//! Participations: a user's presence in a session.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::Storage;
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
    /// and not ended before it): one statement, the session read in it. `None` when
    /// nothing was inserted: the session is missing or refuses the time, or this user has
    /// a participation with this id already; the caller finds out which.
    #[tracing::instrument(skip_all)]
    pub async fn insert_participation(
        &self,
        id: Uuid,
        participation: &NewParticipation,
    ) -> Result<Option<Participation>, Error> {
        let row: Option<ParticipationRow> = sqlx::query_as(&format!(
            "INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
             SELECT $1::uuid, $2::uuid, s.id, $4::text, $5::timestamptz FROM sessions s \
             WHERE s.id = $3 AND s.started_at <= $5 AND (s.ended_at IS NULL OR $5 <= s.ended_at) \
             ON CONFLICT (user_id, id) DO NOTHING \
             RETURNING {PARTICIPATION_COLUMNS}"
        ))
        .bind(id)
        .bind(participation.user_id)
        .bind(participation.session_id)
        .bind(participation.timezone_code.as_str())
        .bind(participation.connected_at)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Participation::from))
    }

    #[tracing::instrument(skip_all, fields(participation_id = %id))]
    pub async fn get_participation(&self, id: Uuid) -> Result<Option<Participation>, Error> {
        participation(&self.pool, id).await
    }

    /// Closes an open participation; `None` when it was closed already (or is gone).
    #[tracing::instrument(skip_all, fields(participation_id = %participation.id))]
    pub async fn leave_participation(
        &self,
        participation: &Participation,
        disconnected_at: DateTime<Utc>,
        usage: &Usage,
    ) -> Result<Option<Participation>, Error> {
        let talked_us = usage.talked_time.num_microseconds().ok_or_else(|| {
            Error::invalid(
                "talked_time",
                "must not be longer than the participation lasted",
            )
        })?;
        let row: Option<ParticipationRow> = sqlx::query_as(&format!(
            "UPDATE participations SET disconnected_at = $3, talked_time_us = $4, \
             microphone_used = $5, speaker_used = $6 \
             WHERE user_id = $1 AND id = $2 AND disconnected_at IS NULL \
             RETURNING {PARTICIPATION_COLUMNS}"
        ))
        .bind(participation.user_id)
        .bind(participation.id)
        .bind(disconnected_at)
        .bind(talked_us)
        .bind(usage.microphone_used)
        .bind(usage.speaker_used)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Participation::from))
    }
}

/// The participation `id`, read over `pool`.
pub(super) async fn participation(pool: &PgPool, id: Uuid) -> Result<Option<Participation>, Error> {
    let row: Option<ParticipationRow> = sqlx::query_as(&format!(
        "SELECT {PARTICIPATION_COLUMNS} FROM participations WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Participation::from))
}
