//! The feed writers' batch statement keeps a plan that reads the batch once, however
//! stale the statistics of `live_feeds` are. PostgreSQL caches a prepared statement's
//! generic plan after its fifth run and keeps it until the table is analysed: a plan
//! made while the table was empty (a new deployment) is still the one used when it
//! holds thousands of feeds. The planner is the judge: the test reads the plan executed.

use krisp_ingest::storage::ADVANCE_FEEDS;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::helpers::spawn_app;

/// `values` as a PostgreSQL array literal of `kind`.
fn array<T: ToString>(values: &[T], kind: &str) -> String {
    let items: Vec<String> = values.iter().map(ToString::to_string).collect();
    format!("'{{{}}}'::{kind}[]", items.join(","))
}

/// A batch of feeds: (users, feeds, epochs, positions written from, written through).
type Batch = (Vec<Uuid>, Vec<Uuid>, Vec<i64>, Vec<i64>, Vec<i64>);

fn execute(batch: &Batch) -> String {
    let (users, feeds, epochs, froms, throughs) = batch;
    format!(
        "EXECUTE advance({}, {}, {}, {}, {})",
        array(users, "uuid"),
        array(feeds, "uuid"),
        array(epochs, "int8"),
        array(froms, "int8"),
        array(throughs, "int8"),
    )
}

/// The executed plan of `batch`, in text, rolled back.
async fn executed_plan(conn: &mut PgConnection, batch: &Batch) -> Vec<String> {
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, COSTS OFF) {}", execute(batch)))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    plan
}

/// `loops=N` of a plan line.
fn loops(line: &str) -> u64 {
    line.rsplit("loops=")
        .next()
        .and_then(|rest| rest.trim_end_matches(')').parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_feed_batch_planned_on_an_empty_table_reads_the_batch_once() {
    let app = spawn_app().await;
    // Nothing analyses the table behind the test's back.
    sqlx::query("ALTER TABLE live_feeds SET (autovacuum_enabled = off)")
        .execute(&app.db)
        .await
        .unwrap();
    let mut owners = Vec::new();
    for _ in 0..20 {
        let participation = app.participation().await;
        owners.push((
            Uuid::parse_str(&participation.user_id).unwrap(),
            Uuid::parse_str(&participation.id).unwrap(),
        ));
    }
    let mut conn = app.db.acquire().await.unwrap();
    sqlx::query(&format!(
        "PREPARE advance (uuid[], uuid[], int8[], int8[], int8[]) AS {ADVANCE_FEEDS}"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    // Six runs while the table is empty, as a writer's first batches after a deployment:
    // the plan cache settles on a plan made now.
    let nobody = (
        vec![owners[0].0],
        vec![Uuid::new_v4()],
        vec![1],
        vec![0],
        vec![1],
    );
    for _ in 0..6 {
        sqlx::query(&execute(&nobody))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    // Then 10,000 feeds open, 500 for each of the 20 users.
    let (users, participations): (Vec<Uuid>, Vec<Uuid>) = owners.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO live_feeds (user_id, feed_id, participation_id) \
         SELECT o.user_id, gen_random_uuid(), o.participation_id \
         FROM unnest($1::uuid[], $2::uuid[]) AS o (user_id, participation_id), \
              generate_series(1, 500)",
    )
    .bind(&users)
    .bind(&participations)
    .execute(&app.db)
    .await
    .unwrap();
    // A batch of 200 of them, each advanced from 0 to 5.
    let chosen: Vec<(Uuid, Uuid)> =
        sqlx::query_as("SELECT user_id, feed_id FROM live_feeds ORDER BY random() LIMIT 200")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let batch: Batch = (
        chosen.iter().map(|c| c.0).collect(),
        chosen.iter().map(|c| c.1).collect(),
        vec![1; 200],
        vec![0; 200],
        vec![5; 200],
    );
    let plan = executed_plan(&mut conn, &batch).await;
    let text = plan.join("\n");
    assert!(
        plan[0].starts_with("Update on live_feeds") && plan[0].contains("rows=200 "),
        "every feed of the batch advanced:\n{text}"
    );
    let reads_of_the_batch: Vec<u64> = plan
        .iter()
        .filter(|line| line.contains("Function Scan on unnest"))
        .map(|line| loops(line))
        .collect();
    assert_eq!(reads_of_the_batch, vec![1], "the batch read once:\n{text}");
}
