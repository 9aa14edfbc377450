//! pg_partman on the coordinator of a Citus cluster, as docs/SCALING.md's steps end:
//! partitions by day of the distributed sentiments and events are themselves distributed,
//! rows land in their day's partition, and the maintenance (moving rows out of the
//! default partition) and the retention run on the cluster, through `krisp-ingest migrate`.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::PgPool;

use crate::{
    helpers::{current_database, spawn_app_on},
    partitions::{participation_since, record},
    require_citus,
};

/// The partitions of `table` holding rows: (partition, rows, distributed by Citus). Read
/// partition by partition on the coordinator (a row's `tableoid` names its shard there).
async fn holding(db: &PgPool, table: &str) -> Vec<(String, i64, bool)> {
    let partitions: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, EXISTS (SELECT 1 FROM pg_dist_partition d \
                                         WHERE d.logicalrelid = c.oid) \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = $1::regclass ORDER BY 1",
    )
    .bind(table)
    .fetch_all(db)
    .await
    .unwrap();
    let mut out = Vec::new();
    for (partition, distributed) in partitions {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {partition}"))
            .fetch_one(db)
            .await
            .unwrap();
        if rows > 0 {
            out.push((partition, rows, distributed));
        }
    }
    out
}

fn day_partition(table: &str, at: DateTime<Utc>) -> String {
    format!("{table}_p{}", at.format("%Y_%m_%d"))
}

#[tokio::test]
async fn day_partitions_are_distributed_maintained_and_retained_on_citus() {
    let cluster = require_citus!();
    let _shared = cluster.shared().await;
    // The retention drops partitions of every user: a database of its own.
    let db = cluster.database().await;
    let url = cluster.url(&current_database(&db).await);
    let registered: Vec<String> =
        sqlx::query_scalar("SELECT parent_table FROM partman.part_config ORDER BY 1")
            .fetch_all(&db)
            .await
            .expect("pg_partman registered the tables (is pg_partman installed?)");
    assert_eq!(registered, ["public.events", "public.sentiments"]);

    let app = spawn_app_on(db.clone()).await;
    let now = Utc::now();
    let participation = participation_since(&app, now - TimeDelta::days(12)).await;
    // Today and three days ago: inside the partitions made at registration. Ten days
    // ago: older than all of them, so into the default partition.
    let days = [now - TimeDelta::days(10), now - TimeDelta::days(3), now];
    for at in days {
        record(&app, &participation, at).await;
    }
    for table in ["sentiments", "events"] {
        let held = holding(&db, table).await;
        assert_eq!(
            held,
            vec![
                (format!("{table}_default"), 1, true),
                (day_partition(table, days[1]), 1, true),
                (day_partition(table, days[2]), 1, true),
            ],
            "{table}"
        );
    }

    // The maintenance round moves the row of ten days ago into a partition made for its
    // day, distributed like the others.
    cluster.krisp_ingest(&url, &["migrate"]);
    for table in ["sentiments", "events"] {
        let held = holding(&db, table).await;
        let expected: Vec<_> = days
            .iter()
            .map(|at| (day_partition(table, *at), 1, true))
            .collect();
        assert_eq!(held, expected, "{table}");
        let distributed_days: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text LIKE $1",
        )
        .bind(format!("{table}\\_p%"))
        .fetch_one(&db)
        .await
        .unwrap();
        assert!(
            distributed_days >= 10,
            "{table}: {distributed_days} day partitions"
        );
    }

    // A retention of five days drops the partition of ten days ago, with its row, on
    // every node; the rest stays.
    cluster.krisp_ingest(&url, &["migrate", "--retention", "5 days"]);
    for table in ["sentiments", "events"] {
        let held = holding(&db, table).await;
        let expected: Vec<_> = days[1..]
            .iter()
            .map(|at| (day_partition(table, *at), 1, true))
            .collect();
        assert_eq!(held, expected, "{table}");
        let dropped: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text = $1",
        )
        .bind(day_partition(table, days[0]))
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(dropped, 0, "{table}");
    }
}
