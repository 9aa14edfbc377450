//! The schema as Citus holds it after the documented steps, read from Citus' own catalog:
//! every table placed, the per-user tables co-located by user id. A table added to the
//! schema but not to `deploy/citus.sql` would stay a local table of the coordinator and
//! still work, so only this catches it.

use crate::require_citus;

#[tokio::test]
async fn every_table_is_placed_and_the_per_user_tables_are_co_located() {
    let cluster = require_citus!();
    let _shared = cluster.shared().await;
    let db = cluster.shared_database().await;
    let unplaced: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
           AND c.relname <> '_sqlx_migrations' \
           AND NOT EXISTS (SELECT 1 FROM pg_dist_partition d WHERE d.logicalrelid = c.oid) \
         ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(
        unplaced.is_empty(),
        "tables Citus does not hold: {unplaced:?}"
    );

    let placed: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, citus_table_type, distribution_column FROM citus_tables \
         WHERE table_name::text NOT LIKE '%\\_p%' AND table_name::text NOT LIKE '%\\_default' \
         ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let expected = [
        ("api_keys", "reference", "<none>"),
        ("event_request_ids", "distributed", "user_id"),
        ("events", "distributed", "user_id"),
        ("ingest_streams", "distributed", "user_id"),
        ("live_feeds", "distributed", "user_id"),
        ("participations", "distributed", "user_id"),
        ("sentiment_request_ids", "distributed", "user_id"),
        ("sentiments", "distributed", "user_id"),
        ("sessions", "distributed", "id"),
        ("timezones", "reference", "<none>"),
        ("user_external_ids", "reference", "<none>"),
        ("users", "distributed", "id"),
    ]
    .map(|(t, k, c)| (t.to_owned(), k.to_owned(), c.to_owned()));
    assert_eq!(placed, expected);

    let groups: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT colocation_id) FROM citus_tables \
         WHERE citus_table_type = 'distributed' AND table_name::text <> 'sessions'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(groups, 1, "the per-user tables are not all co-located");
}
