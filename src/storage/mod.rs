//! PostgreSQL access: every query of the service, with errors translated in one place
//! ([`errors::db_error`]). All statements bind their parameters.

mod batch;
mod call;
pub mod copy;
mod errors;
mod feed;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

pub use errors::db_error;
pub use feed::{FeedCopy, FeedTable, StreamClaim, Unary, claim_stream, finish_stream};

use crate::domain::{
    NewParticipation, NewUser, Participation, Session, SessionType, Timezone, Usage, User,
};
use crate::error::Error;

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The tables the service reads and writes at run time.
const RUNTIME_TABLES: &[&str] = &[
    "user_external_ids",
    "users",
    "timezones",
    "sessions",
    "participations",
    "ingest_streams",
    "sentiments",
    "events",
];

/// Fails unless every embedded migration has been applied, unchanged.
pub async fn check_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| anyhow::anyhow!("cannot read the applied migrations: {e}"))?;
    for migration in MIGRATOR.iter() {
        match applied
            .iter()
            .find(|(version, _)| *version == migration.version)
        {
            Some((_, checksum)) if checksum[..] == migration.checksum[..] => {}
            Some(_) => anyhow::bail!(
                "migration {} was changed after it was applied",
                migration.version
            ),
            None => anyhow::bail!(
                "the database lacks migration {} ({}); run `krisp-ingest migrate` as its owner",
                migration.version,
                migration.description
            ),
        }
    }
    Ok(())
}

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

/// The service's handle on the database.
#[derive(Debug, Clone)]
pub struct Storage {
    pool: PgPool,
    batchers: std::sync::Arc<feed::Batchers>,
}

type UserRow = (
    Uuid,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
);

fn user_from_row(row: UserRow) -> User {
    let (id, external_id, country, native_language, region, created_at) = row;
    User {
        id,
        external_id,
        country,
        native_language,
        region,
        created_at,
    }
}

type SessionRow = (Uuid, String, DateTime<Utc>, Option<DateTime<Utc>>);

fn session_from_row(row: SessionRow) -> Result<Session, Error> {
    let (id, session_type, started_at, ended_at) = row;
    let session_type = SessionType::from_stored(&session_type)
        .ok_or_else(|| Error::internal(anyhow::anyhow!("unknown session type {session_type:?}")))?;
    Ok(Session {
        id,
        session_type,
        started_at,
        ended_at,
    })
}

type ParticipationRow = (
    Uuid,
    Uuid,
    Uuid,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<i64>,
    Option<bool>,
    Option<bool>,
);

const PARTICIPATION_COLUMNS: &str = "id, user_id, session_id, timezone_code, connected_at, \
     disconnected_at, talked_time_us, microphone_used, speaker_used";

fn participation_from_row(row: ParticipationRow) -> Participation {
    let (id, user_id, session_id, timezone_code, connected_at, disconnected_at, talked, mic, spk) =
        row;
    let usage = match (talked, mic, spk) {
        (Some(talked_us), Some(microphone_used), Some(speaker_used)) => Some(Usage {
            talked_time: TimeDelta::microseconds(talked_us),
            microphone_used,
            speaker_used,
        }),
        _ => None,
    };
    Participation {
        id,
        user_id,
        session_id,
        timezone_code,
        connected_at,
        disconnected_at,
        usage,
    }
}

impl Storage {
    /// Wraps `pool` and starts the unary writers (half the pool's connections at most,
    /// so that streams always find connections too). Needs a tokio runtime.
    pub fn new(pool: PgPool) -> Self {
        let writers = usize::try_from(pool.options().get_max_connections() / 2).unwrap_or(1);
        let batchers = std::sync::Arc::new(feed::Batchers::spawn(&pool, writers.max(1)));
        Self { pool, batchers }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Opens a transaction bounded by the current call's deadline.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, Error> {
        call::begin(&self.pool).await
    }

    /// Inserts a user; `None` when a user with this id exists already. The external id
    /// is claimed in `user_external_ids` first, in the same transaction: its primary key
    /// is what keeps external ids unique (migrations/0003_scale_out.sql).
    #[tracing::instrument(skip_all)]
    pub async fn insert_user(&self, id: Uuid, user: &NewUser) -> Result<Option<User>, Error> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO user_external_ids (external_id, user_id) VALUES ($1, $2) \
             ON CONFLICT (user_id, external_id) DO NOTHING",
        )
        .bind(&user.external_id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let row: Option<UserRow> = sqlx::query_as(
            "INSERT INTO users (id, external_id, country, native_language, region) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING \
             RETURNING id, external_id, country, native_language, region, created_at",
        )
        .bind(id)
        .bind(&user.external_id)
        .bind(&user.country)
        .bind(&user.native_language)
        .bind(&user.region)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        match row {
            Some(row) => {
                tx.commit().await.map_err(db_error)?;
                Ok(Some(user_from_row(row)))
            }
            // The id is taken: leave no claim of the external id behind.
            None => Ok(None),
        }
    }

    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn get_user(&self, id: Uuid) -> Result<Option<User>, Error> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, external_id, country, native_language, region, created_at \
             FROM users WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(row.map(user_from_row))
    }

    /// Deletes a user and (by cascade) everything that hangs under the user. Returns the
    /// number of participations deleted, or `None` when there was no such user. The
    /// statements stop with the call (its deadline, or its cancellation).
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    pub async fn delete_user(&self, id: Uuid) -> Result<Option<u64>, Error> {
        let mut tx = self.begin().await?;
        let (participations, deleted) =
            call::cancelled_with_call(&self.pool, &mut tx, |conn| async move {
                let participations: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM participations WHERE user_id = $1")
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(db_error)?;
                // The user's external id row cascades to the user and everything below.
                let deleted = sqlx::query("DELETE FROM user_external_ids WHERE user_id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?
                    .rows_affected();
                Ok((participations, deleted))
            })
            .await?;
        tx.commit().await.map_err(db_error)?;
        if deleted != 1 {
            return Ok(None);
        }
        u64::try_from(participations)
            .map(Some)
            .map_err(Error::internal)
    }

    /// Creates or updates a timezone; `true` when it was created.
    #[tracing::instrument(skip_all, fields(code = %timezone.code))]
    pub async fn upsert_timezone(&self, timezone: &Timezone) -> Result<(Timezone, bool), Error> {
        let (code, utc_offset_seconds, created): (String, i32, bool) = sqlx::query_as(
            "INSERT INTO timezones (code, utc_offset_seconds) VALUES ($1, $2) \
             ON CONFLICT (code) DO UPDATE SET utc_offset_seconds = EXCLUDED.utc_offset_seconds \
             RETURNING code, utc_offset_seconds, (xmax = 0) AS created",
        )
        .bind(&timezone.code)
        .bind(timezone.utc_offset_seconds)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok((
            Timezone {
                code,
                utc_offset_seconds,
            },
            created,
        ))
    }

    #[tracing::instrument(skip_all)]
    pub async fn list_timezones(&self) -> Result<Vec<Timezone>, Error> {
        let rows: Vec<(String, i32)> =
            sqlx::query_as("SELECT code, utc_offset_seconds FROM timezones ORDER BY code")
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|(code, utc_offset_seconds)| Timezone {
                code,
                utc_offset_seconds,
            })
            .collect())
    }

    /// Inserts a session; `None` when a session with this id exists already.
    #[tracing::instrument(skip_all)]
    pub async fn insert_session(&self, session: &Session) -> Result<Option<Session>, Error> {
        let row: Option<SessionRow> = sqlx::query_as(
            "INSERT INTO sessions (id, session_type, started_at, ended_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING RETURNING id, session_type, started_at, ended_at",
        )
        .bind(session.id)
        .bind(session.session_type.as_str())
        .bind(session.started_at)
        .bind(session.ended_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(session_from_row).transpose()
    }

    #[tracing::instrument(skip_all, fields(session_id = %id))]
    pub async fn get_session(&self, id: Uuid) -> Result<Option<Session>, Error> {
        let row: Option<SessionRow> = sqlx::query_as(
            "SELECT id, session_type, started_at, ended_at FROM sessions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(session_from_row).transpose()
    }

    /// Sets the end of a session that has not ended; `None` when it has (or is gone).
    #[tracing::instrument(skip_all, fields(session_id = %id))]
    pub async fn end_session(
        &self,
        id: Uuid,
        ended_at: DateTime<Utc>,
    ) -> Result<Option<Session>, Error> {
        let row: Option<SessionRow> = sqlx::query_as(
            "UPDATE sessions SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL \
             RETURNING id, session_type, started_at, ended_at",
        )
        .bind(id)
        .bind(ended_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(session_from_row).transpose()
    }

    /// Inserts a participation; `None` when this user has one with this id already.
    #[tracing::instrument(skip_all)]
    pub async fn insert_participation(
        &self,
        id: Uuid,
        participation: &NewParticipation,
    ) -> Result<Option<Participation>, Error> {
        let row: Option<ParticipationRow> = sqlx::query_as(&format!(
            "INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, id) DO NOTHING \
             RETURNING {PARTICIPATION_COLUMNS}"
        ))
        .bind(id)
        .bind(participation.user_id)
        .bind(participation.session_id)
        .bind(&participation.timezone_code)
        .bind(participation.connected_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(row.map(participation_from_row))
    }

    #[tracing::instrument(skip_all, fields(participation_id = %id))]
    pub async fn get_participation(&self, id: Uuid) -> Result<Option<Participation>, Error> {
        let row: Option<ParticipationRow> = sqlx::query_as(&format!(
            "SELECT {PARTICIPATION_COLUMNS} FROM participations WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(row.map(participation_from_row))
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
        .await
        .map_err(db_error)?;
        Ok(row.map(participation_from_row))
    }

    /// Records one feed item outside any stream (the unary record RPCs); `false` when the
    /// participation is missing or the item lies outside it.
    pub async fn insert_feed_item<T: FeedTable>(
        &self,
        participation_id: Uuid,
        id: Uuid,
        item: &T,
    ) -> Result<bool, Error> {
        let row = Unary {
            participation_id,
            id,
            item: item.clone(),
        };
        T::batcher(&self.batchers).insert(row).await
    }

    /// The item stored with `id` for a user of `participation`, and its participation.
    pub async fn get_feed_item<T: FeedTable>(
        &self,
        participation: &Participation,
        id: Uuid,
    ) -> Result<Option<(Uuid, T)>, Error> {
        T::stored(&self.pool, participation.user_id, id).await
    }
}
