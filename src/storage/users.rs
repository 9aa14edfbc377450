//! Users, with their external ids (`user_external_ids`, which keeps them unique).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Storage, call};
use crate::domain::{CountryCode, ExternalId, LanguageTag, NewUser, User};
use crate::error::Error;

#[derive(sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    external_id: String,
    country: Option<String>,
    native_language: Option<String>,
    region: Option<String>,
    created_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            id: row.id,
            external_id: ExternalId::from_stored(row.external_id),
            country: row.country.map(CountryCode::from_stored),
            native_language: row.native_language.map(LanguageTag::from_stored),
            region: row.region,
            created_at: row.created_at,
        }
    }
}

impl Storage {
    /// Inserts a user; `None` when a user with this id exists already. The external id
    /// is claimed in `user_external_ids` first, in the same transaction: its primary key
    /// is what keeps external ids unique (migrations/0003_scale_out.sql).
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn insert_user(&self, id: Uuid, user: &NewUser) -> Result<Option<User>, Error> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO user_external_ids (external_id, user_id) VALUES ($1, $2) \
             ON CONFLICT (user_id, external_id) DO NOTHING",
        )
        .bind(user.external_id.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let row: Option<UserRow> = sqlx::query_as(
            "INSERT INTO users (id, external_id, country, native_language, region) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING \
             RETURNING id, external_id, country, native_language, region, created_at",
        )
        .bind(id)
        .bind(user.external_id.as_str())
        .bind(user.country.as_ref().map(CountryCode::as_str))
        .bind(user.native_language.as_ref().map(LanguageTag::as_str))
        .bind(&user.region)
        .fetch_optional(&mut *tx)
        .await?;
        match row {
            Some(row) => {
                tx.commit().await.map_err(|e| Error::from(e).at_commit())?;
                Ok(Some(User::from(row)))
            }
            // The id is taken: leave no claim of the external id behind.
            None => Ok(None),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn get_user(&self, id: Uuid) -> Result<Option<User>, Error> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, external_id, country, native_language, region, created_at \
             FROM users WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(User::from))
    }

    /// Deletes a user and (by cascade) everything that hangs under the user. Returns the
    /// number of participations deleted, or `None` when there was no such user. The
    /// statements stop with the call (its deadline, or its cancellation).
    #[tracing::instrument(skip_all, fields(user_id = %id))]
    ///
    /// `counted` gets the participations counted before the commit: when the commit's
    /// answer is lost, the caller still knows what it deleted.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn delete_user(
        &self,
        id: Uuid,
        counted: &mut Option<u64>,
    ) -> Result<Option<u64>, Error> {
        let mut tx = self.begin().await?;
        let (participations, deleted) =
            call::cancelled_with_call(&self.pool, &mut tx, |conn| async move {
                let participations: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM participations WHERE user_id = $1")
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await?;
                // The user's external id row cascades to the user and everything below.
                let deleted = sqlx::query("DELETE FROM user_external_ids WHERE user_id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                Ok((participations, deleted))
            })
            .await?;
        let participations = u64::try_from(participations).map_err(Error::internal)?;
        *counted = (deleted == 1).then_some(participations);
        tx.commit().await.map_err(|e| Error::from(e).at_commit())?;
        Ok(*counted)
    }
}
