//! Time partitioning of sentiments and events: pg_partman takes the tables over (moving
//! the rows the default partition took), new rows land in partitions by time, retention
//! drops old partitions; and without pg_partman the service ingests into the default
//! partitions and says why.
//!
//! These tests need pg_partman 4.x on the test server (Debian: postgresql-15-partman;
//! `.ci/run` installs it).

use chrono::{DateTime, TimeDelta, Utc};
use krisp_ingest::{
    partitions::{self, PartitionArgs, Partitioning, PartmanMode},
    proto,
    proto::to_timestamp,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, count, drop_role, fresh_database, runtime_role, spawn_app_on};

fn args(interval: &str, retention: Option<&str>) -> PartitionArgs {
    PartitionArgs {
        partman: PartmanMode::Auto,
        partition_interval: interval.into(),
        partition_premake: 4,
        retention: retention.map(Into::into),
        partition_maintenance_seconds: 3600,
    }
}

pub(crate) async fn require_partman(db: &PgPool) {
    let available: Option<String> = sqlx::query_scalar(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_partman'",
    )
    .fetch_optional(db)
    .await
    .unwrap();
    assert!(
        available.as_deref().is_some_and(|v| v.starts_with("4.")),
        "these tests need pg_partman 4.x on the test server (Debian: apt-get install \
         postgresql-15-partman); found {available:?}"
    );
}

/// The partitions of `table` with their bounds, and the rows in each.
async fn partitions_of(db: &PgPool, table: &str) -> Vec<(String, String, i64)> {
    let children: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass \
         ORDER BY 2",
    )
    .bind(table)
    .fetch_all(db)
    .await
    .unwrap();
    let mut out = Vec::new();
    for (name, bound) in children {
        let rows = count(db, &format!("SELECT count(*) FROM {name}")).await;
        out.push((name, bound, rows));
    }
    out
}

/// The time ranges of the partitions of `table` (not the default), in order.
async fn ranges(db: &PgPool, table: &str) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT b[1]::timestamptz, b[2]::timestamptz FROM ( \
             SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid), \
                     'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS b \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = $1::regclass) p \
         WHERE b IS NOT NULL ORDER BY 1",
    )
    .bind(table)
    .fetch_all(db)
    .await
    .unwrap()
}

/// Checks that `ranges` are contiguous, each `step` long.
fn assert_contiguous(ranges: &[(DateTime<Utc>, DateTime<Utc>)], step: TimeDelta) {
    for (start, end) in ranges {
        assert_eq!(*end - *start, step, "{ranges:?}");
    }
    for pair in ranges.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "{ranges:?}");
    }
}

fn covers(ranges: &[(DateTime<Utc>, DateTime<Utc>)], at: DateTime<Utc>) -> bool {
    ranges.iter().any(|(start, end)| *start <= at && at < *end)
}

/// A participation of a new user that started `days_ago` days ago and is still open.
pub(crate) async fn participation_since(
    app: &TestApp,
    start: DateTime<Utc>,
) -> proto::Participation {
    app.upsert_timezone("UTC", 0).await;
    let user = app.create_user(&format!("user-{}", Uuid::new_v4())).await;
    let session = app.create_session(start).await;
    app.join(&user, &session, start).await.unwrap()
}

/// A RecordSentiment of a 1 s segment starting `at`.
pub(crate) fn sentiment_at(
    participation_id: &str,
    at: DateTime<Utc>,
) -> proto::RecordSentimentRequest {
    proto::RecordSentimentRequest {
        participation_id: participation_id.to_owned(),
        sentiment: Some(proto::NewSentiment {
            started_at: Some(to_timestamp(at)),
            ended_at: Some(to_timestamp(at + TimeDelta::seconds(1))),
            label: proto::SentimentLabel::Positive as i32,
            score: Some(0.5),
        }),
        request_id: String::new(),
    }
}

/// A RecordEvent of an event `at`.
pub(crate) fn event_at(participation_id: &str, at: DateTime<Utc>) -> proto::RecordEventRequest {
    proto::RecordEventRequest {
        participation_id: participation_id.to_owned(),
        event: Some(proto::NewEvent {
            occurred_at: Some(to_timestamp(at)),
            kind: proto::EventKind::TalkStarted as i32,
            attributes: Default::default(),
        }),
        request_id: String::new(),
    }
}

/// Records a sentiment and an event `at`; panics unless both are stored.
pub(crate) async fn record(app: &TestApp, participation: &proto::Participation, at: DateTime<Utc>) {
    let mut client = app.client.clone();
    client
        .record_sentiment(sentiment_at(&participation.id, at))
        .await
        .unwrap();
    client
        .record_event(event_at(&participation.id, at))
        .await
        .unwrap();
}

#[tokio::test]
async fn pg_partman_takes_over_partitions_by_time_and_drops_them_after_the_retention() {
    let db = fresh_database().await;
    require_partman(&db).await;
    let app = spawn_app_on(db.clone()).await;
    let now = Utc::now();
    let participation = participation_since(&app, now - TimeDelta::days(30)).await;
    // Before pg_partman: everything goes to the default partitions.
    record(&app, &participation, now - TimeDelta::days(3)).await;
    record(&app, &participation, now - TimeDelta::days(20)).await;
    assert_eq!(
        partitions_of(&db, "sentiments").await,
        vec![("sentiments_default".to_owned(), "DEFAULT".to_owned(), 2)]
    );

    // What startup does as the schema owner.
    let state = partitions::configure(&db, &args("1 day", None))
        .await
        .unwrap();
    let Partitioning::Partman {
        intervals,
        retention,
        ..
    } = &state
    else {
        panic!("pg_partman was not used: {state:?}");
    };
    assert_eq!(
        intervals,
        &vec![
            ("sentiments".to_owned(), "1 day".to_owned()),
            ("events".to_owned(), "1 day".to_owned())
        ]
    );
    assert_eq!(retention, &None);
    for table in ["sentiments", "events"] {
        let parts = partitions_of(&db, table).await;
        // Days from 4 behind to 4 ahead (premake), and the default.
        let days = ranges(&db, table).await;
        let (old, recent) = days.split_at(1);
        assert_contiguous(recent, TimeDelta::days(1));
        for offset in -4..=4 {
            assert!(
                covers(recent, now + TimeDelta::days(offset)),
                "{offset}: {days:?}"
            );
        }
        // The row of 3 days ago moved to its day's partition; the one of 20 days ago,
        // older than any partition, was left in the default by the take-over and then
        // moved by the maintenance into a partition made for its day.
        assert!(covers(old, now - TimeDelta::days(20)), "{days:?}");
        let default = parts.iter().find(|p| p.1 == "DEFAULT").unwrap();
        assert_eq!(default.2, 0, "{table}: {parts:#?}");
        assert_eq!(parts.iter().map(|p| p.2).sum::<i64>(), 2);
    }

    // New rows land in the partition of their day.
    record(&app, &participation, now).await;
    let today: String =
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM sentiments WHERE started_at = $1")
            .bind(now)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(today.starts_with("sentiments_p"), "{today}");

    // Retention of 2 days: the partitions of 3 and 20 days ago are dropped, with their
    // rows.
    let state = partitions::configure(&db, &args("1 day", Some("2 days")))
        .await
        .unwrap();
    assert!(matches!(&state, Partitioning::Partman { retention: Some(r), .. } if r == "2 days"));
    for table in ["sentiments", "events"] {
        let parts = partitions_of(&db, table).await;
        // The day of 2 days ago is kept, the one of 3 days ago is gone.
        let days = ranges(&db, table).await;
        assert_contiguous(&days, TimeDelta::days(1));
        assert!(covers(&days, now - TimeDelta::days(2)), "{days:?}");
        assert!(!covers(&days, now - TimeDelta::days(3)), "{days:?}");
        assert_eq!(
            parts.iter().map(|p| p.2).sum::<i64>(),
            1,
            "{table}: {parts:#?}"
        );
    }
    let kept: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT started_at FROM sentiments ORDER BY started_at")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        kept.len(),
        1,
        "only the row of today is within the retention"
    );
    assert!(
        (kept[0] - now).abs() < TimeDelta::milliseconds(1),
        "{kept:?}"
    );

    // A replica starting with another interval keeps the partition set as it is.
    let state = partitions::configure(&db, &args("1 hour", Some("2 days")))
        .await
        .unwrap();
    assert!(matches!(&state, Partitioning::Partman { intervals, .. } if intervals[0].1 == "1 day"));
}

#[tokio::test]
async fn the_partition_interval_is_configurable() {
    let db = fresh_database().await;
    require_partman(&db).await;
    partitions::configure(&db, &args("1 hour", None))
        .await
        .unwrap();
    let hours = ranges(&db, "events").await;
    assert_contiguous(&hours, TimeDelta::hours(1));
    let now = Utc::now();
    for offset in -4..=4 {
        assert!(
            covers(&hours, now + TimeDelta::hours(offset)),
            "{offset}: {hours:?}"
        );
    }

    for bad in ["soon", "-1 day", "0 seconds"] {
        let error = partitions::configure(&db, &args(bad, None))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("--partition-interval"), "{bad}: {error}");
    }
    let error = partitions::configure(&db, &args("1 day", Some("forever")))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("--retention"), "{error}");
}

#[tokio::test]
async fn without_pg_partman_the_service_ingests_into_the_default_partitions() {
    let owner = fresh_database().await;
    // A role that may use the tables but not create extensions or schemas: pg_partman
    // is not in this database and cannot be put there.
    let (role, runtime) = runtime_role(&owner, "krisp_nopartman").await;

    let state = partitions::configure(&runtime, &args("1 day", Some("30 days")))
        .await
        .unwrap();
    let Partitioning::DefaultOnly { reason } = &state else {
        panic!("{state:?}");
    };
    assert!(
        reason.contains("not in database") || reason.contains("not installed"),
        "{reason}"
    );
    let off = PartitionArgs {
        partman: PartmanMode::Off,
        ..PartitionArgs::default()
    };
    assert!(matches!(
        partitions::configure(&owner, &off).await.unwrap(),
        Partitioning::DefaultOnly { .. }
    ));
    let installed: i64 = count(
        &owner,
        "SELECT count(*) FROM pg_extension WHERE extname = 'pg_partman'",
    )
    .await;
    assert_eq!(installed, 0);

    let app = spawn_app_on(runtime.clone()).await;
    let now = Utc::now();
    let participation = participation_since(&app, now - TimeDelta::days(1)).await;
    record(&app, &participation, now).await;
    assert_eq!(
        partitions_of(&owner, "sentiments").await,
        vec![("sentiments_default".to_owned(), "DEFAULT".to_owned(), 1)]
    );
    assert_eq!(
        count(&owner, "SELECT count(*) FROM events_default").await,
        1
    );

    drop(app);
    runtime.close().await;
    drop_role(&owner, &role).await;
}

#[tokio::test]
async fn replicas_starting_together_register_the_tables_once() {
    let db = fresh_database().await;
    require_partman(&db).await;
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { partitions::configure(&db, &args("1 day", None)).await })
        })
        .collect();
    for start in starts {
        let state = start.await.unwrap().unwrap();
        assert!(matches!(state, Partitioning::Partman { .. }), "{state:?}");
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM partman.part_config").await,
        2
    );
    assert_contiguous(&ranges(&db, "sentiments").await, TimeDelta::days(1));
    // One set of partitions: a second registration would have failed or doubled them.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_partitioned_table pt JOIN pg_class d ON d.oid = pt.partdefid \
             WHERE d.relname IN ('sentiments_default', 'events_default')"
        )
        .await,
        2
    );
}

/// A year of daily partitions (no retention): timelines read at once still work. A
/// generic plan locks every partition of both tables when it starts (~3,000 locks here;
/// PostgreSQL builds one at a prepared statement's sixth run, to compare), and eight of
/// them at once ran out of the lock table ("out of shared memory"); the timeline is
/// planned for its participation instead, which leaves the older partitions out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timelines_read_at_once_with_a_year_of_partitions() {
    let app = app_with_a_year_of_partitions().await;
    let participation = app.participation().await;
    record(
        &app,
        &participation,
        crate::helpers::t0() + TimeDelta::seconds(1),
    )
    .await;
    for round in 0..8 {
        let reads: Vec<_> = (0..16)
            .map(|_| {
                let mut client = app.client.clone();
                let participation_id = participation.id.clone();
                tokio::spawn(async move {
                    let mut entries = client
                        .get_timeline(proto::GetTimelineRequest {
                            participation_id,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    let mut read = 0;
                    while entries.message().await?.is_some() {
                        read += 1;
                    }
                    Ok::<_, tonic::Status>(read)
                })
            })
            .collect();
        for read in reads {
            // The sentiment and the event `record` stored.
            let read = read.await.unwrap();
            assert!(matches!(read, Ok(2)), "round {round}: {read:?}");
        }
    }
}

/// A year of daily partitions: retries of one RecordSentiment sent at once all get the
/// sentiment stored. A retry reads the stored item back; by user and id alone that read
/// locked every partition (a prepared statement's generic plan), and sixteen at once ran
/// out of the lock table ("out of shared memory"). It now reads the claim of the
/// `request_id`, then the item in the partition of the claim's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_at_once_with_a_year_of_partitions() {
    let app = app_with_a_year_of_partitions().await;
    let participation = app.participation().await;
    let request = proto::RecordSentimentRequest {
        request_id: Uuid::new_v4().to_string(),
        ..sentiment_at(
            &participation.id,
            crate::helpers::t0() + TimeDelta::seconds(1),
        )
    };
    let first = app.client.clone().record_sentiment(request.clone()).await;
    let first = first.unwrap().into_inner();
    for round in 0..8 {
        let retries: Vec<_> = (0..16)
            .map(|_| {
                let (mut client, request) = (app.client.clone(), request.clone());
                tokio::spawn(async move { client.record_sentiment(request).await })
            })
            .collect();
        for retry in retries {
            let retry = retry.await.unwrap().map(|r| r.into_inner());
            assert!(
                matches!(&retry, Ok(r) if *r == first),
                "round {round}: {retry:?}"
            );
        }
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 1);
}

/// A server on a fresh database with 365 empty daily partitions of sentiments and events
/// from 2020 on, and the service's own pool settings with a connection for each of 16
/// calls at once.
async fn app_with_a_year_of_partitions() -> TestApp {
    let db = fresh_database().await;
    for table in ["sentiments", "events"] {
        let days: Vec<String> = (0..365)
            .map(|day| {
                format!(
                    "CREATE TABLE {table}_old_{day} PARTITION OF {table} FOR VALUES \
                     FROM ('2020-01-01'::timestamptz + interval '{day} days') \
                     TO ('2020-01-01'::timestamptz + interval '{} days')",
                    day + 1
                )
            })
            .collect();
        sqlx::raw_sql(&days.join(";\n")).execute(&db).await.unwrap();
    }
    let own = krisp_ingest::storage::OWN_CONNECTIONS;
    let pool = krisp_ingest::app::pool_options(16 + own)
        .connect_with((*db.connect_options()).clone())
        .await
        .unwrap();
    spawn_app_on(pool).await
}
