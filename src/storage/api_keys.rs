//! The API keys' table: hashes and scopes only, never a key (`crate::auth` makes and
//! checks keys).

use sqlx::PgPool;

/// A key as listed: never its hash.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeySummary {
    pub name: String,
    pub scopes: Vec<String>,
    pub revoked: bool,
}

pub(crate) async fn insert(
    pool: &PgPool,
    name: &str,
    hash: &[u8],
    scopes: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO api_keys (name, key_hash, scopes) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(hash)
        .bind(scopes)
        .execute(pool)
        .await?;
    Ok(())
}

/// `false` when there is no live key named `name`.
pub(crate) async fn revoke(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let revoked = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
    )
    .bind(name)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(revoked == 1)
}

pub(crate) async fn list(pool: &PgPool) -> Result<Vec<KeySummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, scopes, revoked_at IS NOT NULL AS revoked FROM api_keys ORDER BY name",
    )
    .fetch_all(pool)
    .await
}

/// Whether any key was ever created.
pub(crate) async fn any(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
        .fetch_one(pool)
        .await
}

/// The hash and scopes of every live key.
pub(crate) async fn live(pool: &PgPool) -> Result<Vec<(Vec<u8>, Vec<String>)>, sqlx::Error> {
    sqlx::query_as("SELECT key_hash, scopes FROM api_keys WHERE revoked_at IS NULL")
        .fetch_all(pool)
        .await
}
