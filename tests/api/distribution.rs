//! One client stream writes rows of one user only, so that on Citus (distributed by user
//! id) it stays on one shard: a rule of the service's code, which the Citus suite
//! (`citus/`) does not see, since a stream spanning two users would still work there.

use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{count, frames, fresh_database, spawn_app_on};
use krisp_ingest::proto;

/// Records, per transaction, the user of every row written to the per-user tables.
async fn audit_writes(db: &PgPool) {
    for statement in [
        "CREATE TABLE write_audit (txid bigint NOT NULL, tbl text NOT NULL, user_id uuid)",
        "CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           INSERT INTO write_audit VALUES (txid_current(), TG_TABLE_NAME, \
             (to_jsonb(coalesce(NEW, OLD)) ->> TG_ARGV[0])::uuid); \
           RETURN NULL; \
         END $$",
    ] {
        sqlx::query(statement).execute(db).await.unwrap();
    }
    for (table, column) in [
        ("users", "id"),
        ("participations", "user_id"),
        ("ingest_streams", "user_id"),
        ("sentiments", "user_id"),
        ("events", "user_id"),
    ] {
        sqlx::query(&format!(
            "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {table} \
             FOR EACH ROW EXECUTE FUNCTION audit_write('{column}')"
        ))
        .execute(db)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn one_stream_writes_the_rows_of_one_user_only() {
    let db = fresh_database().await;
    audit_writes(&db).await;
    let app = spawn_app_on(db.clone()).await;
    // Five users, each with a participation; their streams run at the same time.
    let mut participations = Vec::new();
    for _ in 0..5 {
        participations.push(app.participation().await);
    }
    sqlx::query("TRUNCATE write_audit")
        .execute(&db)
        .await
        .unwrap();
    let calls: Vec<_> = participations
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let sentiments = frames::stream(
                &Uuid::new_v4().to_string(),
                &p.id,
                vec![
                    crate::helpers::sentiments(0, 1500),
                    crate::helpers::sentiments(1500, 1500),
                ],
            );
            let events = events_stream(&p.id, 40 + i);
            let (mut a, mut b) = (app.client.clone(), app.client.clone());
            [
                tokio::spawn(async move {
                    a.stream_sentiments(tokio_stream::iter(sentiments))
                        .await
                        .map(|_| ())
                }),
                tokio::spawn(async move {
                    b.stream_events(tokio_stream::iter(events))
                        .await
                        .map(|_| ())
                }),
            ]
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 15_000);

    let per_tx: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT txid, count(DISTINCT user_id), count(*) FROM write_audit \
         GROUP BY txid ORDER BY txid",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    println!("stream transactions (txid, users, rows): {per_tx:?}");
    assert_eq!(per_tx.len(), 10, "one transaction per stream: {per_tx:?}");
    for (txid, users, _) in &per_tx {
        assert_eq!(*users, 1, "transaction {txid} wrote rows of {users} users");
    }
    let null_users = count(
        &db,
        "SELECT count(*) FROM write_audit WHERE user_id IS NULL",
    )
    .await;
    assert_eq!(null_users, 0);
}

fn events_stream(participation_id: &str, n: usize) -> Vec<proto::StreamEventsRequest> {
    let events = (0..n as i64)
        .map(|i| proto::NewEvent {
            occurred_at: crate::helpers::at(crate::helpers::t0(), i),
            kind: proto::EventKind::TalkStarted as i32,
            attributes: Default::default(),
        })
        .collect();
    crate::helpers::event_frames::stream(
        &Uuid::new_v4().to_string(),
        participation_id,
        vec![events],
    )
}
