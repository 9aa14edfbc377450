//! A start never waits for partition maintenance: rows in a default partition (dated
//! before any partition existed) move into partitions of their own in the background,
//! in short transactions, while the service serves.

use chrono::{TimeDelta, Utc};
use krisp_ingest::proto;
use uuid::Uuid;

use crate::{
    binary::start_logged,
    helpers::{
        connect, count, current_database, database_url, eventually, fresh_data_dir, fresh_database,
        spawn_app_on,
    },
    partitions::{participation_since, require_partman},
};

const ROWS: i64 = 300_000;

#[tokio::test]
async fn a_start_over_a_full_default_partition_serves_while_its_rows_move() {
    let db = fresh_database().await;
    require_partman(&db).await;
    // Rows of a month ago, in the default partition: pg_partman has no partitions yet.
    let app = spawn_app_on(db.clone()).await;
    let start = Utc::now() - TimeDelta::days(30);
    let participation = participation_since(&app, start).await;
    sqlx::query(
        "INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label) \
         SELECT gen_random_uuid(), $1, $2, $3 + g * interval '5 s', \
                $3 + g * interval '5 s' + interval '1 s', 'neutral' \
         FROM generate_series(0, $4 - 1) g",
    )
    .bind(Uuid::parse_str(&participation.user_id).unwrap())
    .bind(Uuid::parse_str(&participation.id).unwrap())
    .bind(start)
    .bind(ROWS)
    .execute(&db)
    .await
    .unwrap();

    // The service as an operator starts it: migrations, pg_partman, maintenance.
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&db)
        .await
        .unwrap();
    let url = database_url(&current_database(&db).await, &role).await;
    let (_root, data_dir) = fresh_data_dir();
    let (mut child, address, _lines, _) = start_logged(&data_dir, &[("DATABASE_URL", &url)]);
    let mut client = proto::ingest_service_client::IngestServiceClient::new(connect(address).await);
    client
        .list_timezones(proto::ListTimezonesRequest {})
        .await
        .expect("serving at once");
    // It listened and served before the rows had moved.
    let waiting = count(&db, "SELECT count(*) FROM ONLY sentiments_default").await;
    assert!(
        waiting > 0,
        "every row had moved before the service listened"
    );

    eventually("the rows to move out of the default partition", || async {
        count(&db, "SELECT count(*) FROM ONLY sentiments_default").await == 0
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, ROWS);
    let _ = child.kill();
    let _ = child.wait();
}
