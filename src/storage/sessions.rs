//! Timezones and sessions: the reference data participations point at.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Storage;
use crate::domain::{Session, SessionType, Timezone, TimezoneCode};
use crate::error::Error;

#[derive(sqlx::FromRow)]
struct SessionRow {
    id: Uuid,
    session_type: String,
    started_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    last_connected_at: Option<DateTime<Utc>>,
}

const SESSION_COLUMNS: &str = "id, session_type, started_at, ended_at, last_connected_at";

impl TryFrom<SessionRow> for Session {
    type Error = Error;

    fn try_from(row: SessionRow) -> Result<Self, Error> {
        let session_type = SessionType::from_stored(&row.session_type).ok_or_else(|| {
            Error::internal(anyhow::anyhow!(
                "unknown session type {:?}",
                row.session_type
            ))
        })?;
        Ok(Self {
            id: row.id,
            session_type,
            started_at: row.started_at,
            ended_at: row.ended_at,
            last_connected_at: row.last_connected_at,
        })
    }
}

impl Storage {
    /// Creates or updates a timezone; `true` when it was created.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn upsert_timezone(&self, timezone: &Timezone) -> Result<(Timezone, bool), Error> {
        let (code, utc_offset_seconds, created): (String, i32, bool) = sqlx::query_as(
            "INSERT INTO timezones (code, utc_offset_seconds) VALUES ($1, $2) \
             ON CONFLICT (code) DO UPDATE SET utc_offset_seconds = EXCLUDED.utc_offset_seconds \
             RETURNING code, utc_offset_seconds, (xmax = 0) AS created",
        )
        .bind(timezone.code.as_str())
        .bind(timezone.utc_offset_seconds)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::from(e).at_commit())?;
        Ok((
            Timezone {
                code: TimezoneCode::from_stored(code),
                utc_offset_seconds,
            },
            created,
        ))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn list_timezones(&self) -> Result<Vec<Timezone>, Error> {
        let rows: Vec<(String, i32)> =
            sqlx::query_as("SELECT code, utc_offset_seconds FROM timezones ORDER BY code")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(code, utc_offset_seconds)| Timezone {
                code: TimezoneCode::from_stored(code),
                utc_offset_seconds,
            })
            .collect())
    }

    /// Inserts a session; `None` when a session with this id exists already.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn insert_session(&self, session: &Session) -> Result<Option<Session>, Error> {
        let row: Option<SessionRow> = sqlx::query_as(&format!(
            "INSERT INTO sessions (id, session_type, started_at, ended_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING RETURNING {SESSION_COLUMNS}"
        ))
        .bind(session.id)
        .bind(session.session_type.as_str())
        .bind(session.started_at)
        .bind(session.ended_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::from(e).at_commit())?;
        row.map(Session::try_from).transpose()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn get_session(&self, id: Uuid) -> Result<Option<Session>, Error> {
        let row: Option<SessionRow> = sqlx::query_as(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Session::try_from).transpose()
    }

    /// Sets the end of a session that has not ended; `None` when it has (or is gone). The
    /// schema refuses an end before the session's last connection
    /// (`sessions_ends_after_last_connection`): a JoinSession that committed first.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn end_session(
        &self,
        id: Uuid,
        ended_at: DateTime<Utc>,
    ) -> Result<Option<Session>, Error> {
        let row: Option<SessionRow> = sqlx::query_as(&format!(
            "UPDATE sessions SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL \
             RETURNING {SESSION_COLUMNS}"
        ))
        .bind(id)
        .bind(ended_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::from(e).at_commit())?;
        row.map(Session::try_from).transpose()
    }
}
