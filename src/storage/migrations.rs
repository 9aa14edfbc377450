//! The schema's migrations: applying them, and checking at start-up that a database has
//! every one of them, unchanged.
//!
//! sqlx records each applied migration's checksum (SHA-384 of its file) and refuses to run
//! on a database whose record differs from the file. A migration's statements never
//! change once it is released; its comments may be reworded. [`REWORDED`] lists those,
//! with the checksum of the text they were released with, so that a database that
//! applied the earlier text is still up to date: [`migrate`] records the current checksum
//! for it, and [`check_migrated`] accepts either.

use sqlx::{PgPool, migrate::MigrateError};

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Migrations whose comments were reworded after release, statements unchanged: version
/// and the hex SHA-384 of the text as released.
const REWORDED: &[(i64, &str)] = &[(
    8,
    "110eb792f27925e49b2ce263179f02d286d76db97eb75c3c639389bb4a45786ebfe4f12808917e28e6b495850ab64837",
)];

/// Applies the pending migrations, after recording the current checksum of those in
/// [`REWORDED`] that a database applied in their earlier text.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(MigrateError::Execute)?;
    if recorded {
        for (version, released) in REWORDED {
            let Some(migration) = MIGRATOR.iter().find(|m| m.version == *version) else {
                continue;
            };
            sqlx::query(
                "UPDATE _sqlx_migrations SET checksum = $1 \
                 WHERE version = $2 AND checksum = decode($3, 'hex')",
            )
            .bind(&migration.checksum[..])
            .bind(version)
            .bind(released)
            .execute(pool)
            .await
            .map_err(MigrateError::Execute)?;
        }
    }
    MIGRATOR.run(pool).await
}

/// Whether `checksum` is the text `version` was released with, reworded since.
fn released_text(version: i64, checksum: &[u8]) -> bool {
    let hex: String = checksum.iter().map(|b| format!("{b:02x}")).collect();
    REWORDED
        .iter()
        .any(|(reworded, released)| *reworded == version && *released == hex)
}

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
            Some((version, checksum)) if released_text(*version, checksum) => {}
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
