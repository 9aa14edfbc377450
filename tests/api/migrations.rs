//! Migrations keep the data of a database that has been in use: 0003 (scale-out) moves
//! external ids into user_external_ids and sentiments/events into partitioned tables; 0009
//! gives each session the latest connection of its participations.

use sqlx::PgPool;

use krisp_ingest::storage;

use crate::helpers::{count, empty_database};

async fn run(db: &PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(db).await.unwrap();
}

#[tokio::test]
async fn the_scale_out_migration_keeps_existing_users_sentiments_and_events() {
    let db = empty_database().await;
    run(&db, include_str!("../../migrations/0001_schema.sql")).await;
    run(&db, include_str!("../../migrations/0002_api_keys.sql")).await;
    // A database with data, as migrations 0001 and 0002 shaped it.
    run(
        &db,
        "INSERT INTO timezones VALUES ('UTC', 0);
         INSERT INTO users (id, external_id) VALUES
             ('00000000-0000-7000-8000-000000000001', 'alice'),
             ('00000000-0000-7000-8000-000000000002', 'bob');
         INSERT INTO sessions (id, session_type, started_at)
             VALUES ('00000000-0000-7000-8000-0000000000aa', 'call', '2026-01-01T10:00:00Z');
         INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at)
             VALUES ('00000000-0000-7000-8000-0000000000b1',
                     '00000000-0000-7000-8000-000000000001',
                     '00000000-0000-7000-8000-0000000000aa', 'UTC', '2026-01-01T10:00:00Z');
         INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label, score)
             SELECT gen_random_uuid(), '00000000-0000-7000-8000-000000000001',
                    '00000000-0000-7000-8000-0000000000b1',
                    '2026-01-01T10:00:00Z'::timestamptz + g * interval '1 s',
                    '2026-01-01T10:00:01Z'::timestamptz + g * interval '1 s', 'neutral', 0.5
             FROM generate_series(0, 99) g;
         INSERT INTO events (id, user_id, participation_id, occurred_at, kind, attributes)
             VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000001',
                     '00000000-0000-7000-8000-0000000000b1', '2026-01-01T10:00:05Z',
                     'talk_started', '{\"device\": \"headset\"}');",
    )
    .await;

    run(&db, include_str!("../../migrations/0003_scale_out.sql")).await;

    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 100);
    assert_eq!(
        count(&db, "SELECT count(*) FROM sentiments_default").await,
        100
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM events WHERE attributes ->> 'device' = 'headset'"
        )
        .await,
        1
    );
    let external: Vec<(String, String)> = sqlx::query_as(
        "SELECT external_id, user_id::text FROM user_external_ids ORDER BY external_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        external,
        vec![
            (
                "alice".into(),
                "00000000-0000-7000-8000-000000000001".into()
            ),
            ("bob".into(), "00000000-0000-7000-8000-000000000002".into()),
        ]
    );
    // The rules still hold after the move: a second "alice", a sentiment without its
    // participation.
    let taken = sqlx::raw_sql(
        "INSERT INTO user_external_ids VALUES ('alice', '00000000-0000-7000-8000-000000000003')",
    )
    .execute(&db)
    .await
    .unwrap_err();
    assert_eq!(
        taken.as_database_error().and_then(|e| e.constraint()),
        Some("user_external_ids_pkey")
    );
    let orphan = sqlx::raw_sql(
        "INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label)
         VALUES (gen_random_uuid(), '00000000-0000-7000-8000-000000000002',
                 '00000000-0000-7000-8000-0000000000b1', now(), now() + interval '1 s',
                 'neutral')",
    )
    .execute(&db)
    .await
    .unwrap_err();
    assert_eq!(
        orphan.as_database_error().and_then(|e| e.constraint()),
        Some("sentiments_participation_fkey")
    );
    // Deleting alice's external id removes alice and everything of hers.
    run(
        &db,
        "DELETE FROM user_external_ids WHERE external_id = 'alice'",
    )
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 0);
}

#[tokio::test]
async fn sessions_learn_their_latest_connection_from_the_participations_stored() {
    let db = empty_database().await;
    for sql in [
        include_str!("../../migrations/0001_schema.sql"),
        include_str!("../../migrations/0002_api_keys.sql"),
        include_str!("../../migrations/0003_scale_out.sql"),
        include_str!("../../migrations/0004_rows_hang_from_participations.sql"),
        include_str!("../../migrations/0005_stream_digest.sql"),
        include_str!("../../migrations/0006_live_feeds.sql"),
        include_str!("../../migrations/0007_text_without_control_characters.sql"),
        include_str!("../../migrations/0008_request_ids.sql"),
    ] {
        run(&db, sql).await;
    }
    run(
        &db,
        "INSERT INTO timezones VALUES ('UTC', 0);
         INSERT INTO user_external_ids VALUES
             ('alice', '00000000-0000-7000-8000-000000000001'),
             ('bob', '00000000-0000-7000-8000-000000000002');
         INSERT INTO users (id, external_id) VALUES
             ('00000000-0000-7000-8000-000000000001', 'alice'),
             ('00000000-0000-7000-8000-000000000002', 'bob');
         INSERT INTO sessions (id, session_type, started_at) VALUES
             ('00000000-0000-7000-8000-0000000000aa', 'call', '2026-01-01T10:00:00Z'),
             ('00000000-0000-7000-8000-0000000000bb', 'call', '2026-01-01T10:00:00Z');
         INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at)
             VALUES ('00000000-0000-7000-8000-0000000000b1',
                     '00000000-0000-7000-8000-000000000001',
                     '00000000-0000-7000-8000-0000000000aa', 'UTC', '2026-01-01T10:05:00Z'),
                    ('00000000-0000-7000-8000-0000000000b2',
                     '00000000-0000-7000-8000-000000000002',
                     '00000000-0000-7000-8000-0000000000aa', 'UTC', '2026-01-01T10:20:00Z');",
    )
    .await;

    run(
        &db,
        include_str!("../../migrations/0009_sessions_span_their_connections.sql"),
    )
    .await;

    let latest: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT id::text, to_char(last_connected_at AT TIME ZONE 'UTC', 'HH24:MI') \
         FROM sessions ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        latest,
        [
            (
                "00000000-0000-7000-8000-0000000000aa".into(),
                Some("10:20".into())
            ),
            ("00000000-0000-7000-8000-0000000000bb".into(), None),
        ]
    );
    let early_end = sqlx::raw_sql(
        "UPDATE sessions SET ended_at = '2026-01-01T10:10:00Z' \
         WHERE id = '00000000-0000-7000-8000-0000000000aa'",
    )
    .execute(&db)
    .await
    .unwrap_err();
    assert!(
        early_end
            .to_string()
            .contains("sessions_ends_after_last_connection"),
        "{early_end}"
    );
}

/// The hex SHA-384 of migration 0008 as it was released, before its comments were
/// reworded (its statements are the same).
const RELEASED_0008: &str = "110eb792f27925e49b2ce263179f02d286d76db97eb75c3c639389bb4a45786ebfe4f12808917e28e6b495850ab64837";

async fn record_checksum_of_0008(db: &PgPool, hex: &str) {
    sqlx::query("UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 8")
        .bind(hex)
        .execute(db)
        .await
        .unwrap();
}

async fn checksum_of_0008(db: &PgPool) -> Vec<u8> {
    sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = 8")
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_database_that_applied_a_migration_before_its_comments_were_reworded_is_up_to_date() {
    let db = crate::helpers::fresh_database().await;
    let current = storage::MIGRATOR
        .iter()
        .find(|m| m.version == 8)
        .unwrap()
        .checksum
        .to_vec();

    // As a database that applied the released text holds it.
    record_checksum_of_0008(&db, RELEASED_0008).await;
    storage::check_migrated(&db).await.unwrap();
    storage::migrate(&db).await.unwrap();
    assert_eq!(
        checksum_of_0008(&db).await,
        current,
        "migrate records the current text"
    );
    storage::check_migrated(&db).await.unwrap();

    // A migration changed in any other way is still refused, by both.
    record_checksum_of_0008(&db, &"00".repeat(48)).await;
    let error = storage::check_migrated(&db).await.unwrap_err().to_string();
    assert!(error.contains("migration 8 was changed"), "{error}");
    assert!(storage::migrate(&db).await.is_err());
    assert_ne!(checksum_of_0008(&db).await, current);
}
