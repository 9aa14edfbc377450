//! The service runs as a role that may only read and write its tables: migrations run as
//! the owner, and the runtime role can neither change the schema nor drop or truncate.

use krisp_ingest::{config::Limits, storage};

use crate::helpers::{count, drop_role, fresh_database, runtime_role, sentiments, spawn_app_with};

#[tokio::test]
async fn the_runtime_role_serves_but_cannot_drop_truncate_or_alter() {
    let owner = fresh_database().await;
    let (role, runtime) = runtime_role(&owner, "krisp_app").await;
    // What `--skip-migrations` does at startup.
    storage::check_migrated(&runtime).await.unwrap();
    let app = spawn_app_with(runtime.clone(), Limits::default()).await;
    let participation = app.participation().await;
    app.stream_sentiments(&participation.id, vec![sentiments(0, 50)])
        .await;
    assert_eq!(count(&owner, "SELECT count(*) FROM sentiments").await, 50);

    for statement in [
        "DROP TABLE sentiments",
        "TRUNCATE sentiments",
        "TRUNCATE users CASCADE",
        "CREATE TABLE intruder (id int)",
        "ALTER TABLE users DROP CONSTRAINT users_external_id_fkey",
        "ALTER TABLE participations DROP CONSTRAINT participations_no_overlap",
        "DROP INDEX sentiments_timeline_idx",
        "DELETE FROM _sqlx_migrations",
    ] {
        let error = sqlx::query(statement).execute(&runtime).await.unwrap_err();
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{statement}: {error}");
    }
    assert_eq!(count(&owner, "SELECT count(*) FROM sentiments").await, 50);

    drop(app);
    runtime.close().await;
    drop_role(&owner, &role).await;
}

#[tokio::test]
async fn skip_migrations_refuses_a_database_that_lacks_them() {
    let owner = fresh_database().await;
    sqlx::query("DELETE FROM _sqlx_migrations")
        .execute(&owner)
        .await
        .unwrap();
    let error = storage::check_migrated(&owner)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("krisp-ingest migrate"), "{error}");
}
