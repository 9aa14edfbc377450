//! Items dated oddly: a future-dated row once made every later start exit 1 (pg_partman
//! could not make the partition its time needed while the row sat in the default
//! partition). Now maintenance moves such rows into partitions of their own, a failed
//! maintenance never stops the service, and items too far from the server's clock are
//! refused at ingest, naming the item.

use chrono::{TimeDelta, Utc};
use krisp_ingest::{config::Limits, domain::ItemClock, proto, proto::to_timestamp};
use sqlx::PgPool;
use uuid::Uuid;

use crate::binary::{metrics_address, start_logged, terminate, wait_for_line};
use crate::helpers::{
    TestApp, count, current_database, database_url, eventually, frames, fresh_data_dir,
    fresh_database, spawn_app_with, violations,
};
use crate::metrics::{scrape, value};
use crate::partitions::{event_at, participation_since, record, require_partman, sentiment_at};

/// A DATABASE_URL for `db`'s database, as the role the tests connect as.
pub(crate) async fn url_of(db: &PgPool) -> String {
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(db)
        .await
        .unwrap();
    database_url(&current_database(db).await, &role).await
}

/// The partition holding the one row of `table`.
async fn home_of_the_row(db: &PgPool, table: &str) -> String {
    sqlx::query_scalar(&format!("SELECT tableoid::regclass::text FROM {table}"))
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_future_dated_row_no_longer_stops_the_next_start() {
    let db = fresh_database().await;
    require_partman(&db).await;
    let url = url_of(&db).await;
    let (_root, data_dir) = fresh_data_dir();

    // The reproduction: a server that accepts items days ahead (as every server did before
    // the bound existed) records one 6 days ahead, beyond the 4 premade daily partitions.
    let (child, address, lines, logged) = start_logged(
        &data_dir,
        &[
            ("DATABASE_URL", &url),
            ("KRISP_MAX_FUTURE_SKEW_SECONDS", "864000"),
        ],
    );
    // Its first maintenance round runs in the background and would move the row into a
    // partition of its own if it ran after the row came in: the row is written once the
    // round is through (the next one is an hour away).
    let metrics_address = metrics_address(&logged);
    let ok = r#"krisp_partition_maintenance_total{outcome="ok"}"#;
    eventually("the first maintenance round is through", || async move {
        value(&scrape(metrics_address).await, ok) >= 1.0
    })
    .await;
    let app = TestApp::connect(address, db.clone()).await;
    let now = Utc::now();
    let participation = participation_since(&app, now).await;
    let ahead = now + TimeDelta::days(6);
    record(&app, &participation, ahead).await;
    for table in ["sentiments", "events"] {
        assert_eq!(
            home_of_the_row(&db, table).await,
            format!("{table}_default")
        );
    }
    drop(app);
    assert!(terminate(child, &lines).await.success());

    // The next start (defaults) serves, and its maintenance emptied the default partitions.
    // Its maintenance runs in the background, once it serves.
    let (child, address, lines, _) = start_logged(&data_dir, &[("DATABASE_URL", &url)]);
    for table in ["sentiments", "events"] {
        let moved = wait_for_line(&lines, "moved rows out of the default partition");
        assert!(moved.contains(table), "{moved}");
        assert_eq!(
            count(&db, &format!("SELECT count(*) FROM {table}_default")).await,
            0
        );
        let home = home_of_the_row(&db, table).await;
        assert!(home.starts_with(&format!("{table}_p")), "{table}: {home}");
    }
    let app = TestApp::connect(address, db.clone()).await;
    record(&app, &participation, now + TimeDelta::seconds(1)).await;
    // The same item is now refused, naming its field, and nothing of it is stored.
    let status = app
        .client
        .clone()
        .record_sentiment(sentiment_at(&participation.id, ahead))
        .await
        .unwrap_err();
    let found = violations(&status);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "sentiment.started_at");
    assert!(
        found[0].1.contains("6 days ahead of the server's clock")
            && found[0].1.contains("at most 15 min in the future"),
        "{found:?}"
    );
    let status = app
        .client
        .clone()
        .record_event(event_at(&participation.id, ahead))
        .await
        .unwrap_err();
    assert_eq!(violations(&status)[0].0, "event.occurred_at");
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 2);
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 2);
    drop(app);
    assert!(terminate(child, &lines).await.success());
}

#[tokio::test]
async fn a_failing_maintenance_is_logged_counted_and_retried_while_ingest_goes_on() {
    let db = fresh_database().await;
    require_partman(&db).await;
    krisp_ingest::partitions::configure(&db, &Default::default())
        .await
        .unwrap();
    // A row 6 days ahead in the default partition, written by a permissive server.
    let permissive = Limits {
        item_clock: ItemClock {
            max_future: TimeDelta::days(10),
            max_age: None,
        },
        ..Limits::default()
    };
    let app = spawn_app_with(db.clone(), permissive).await;
    let now = Utc::now();
    let participation = participation_since(&app, now).await;
    record(&app, &participation, now + TimeDelta::days(6)).await;
    drop(app);

    // A long transaction holds a lock that moving rows out of the default needs (but
    // ingest does not): every maintenance round times out on it.
    let mut blocker = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE sentiments_default IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();

    let (_root, data_dir) = fresh_data_dir();
    let url = url_of(&db).await;
    let (child, address, lines, logged) = start_logged(
        &data_dir,
        &[
            ("DATABASE_URL", &url),
            ("KRISP_PARTITION_MAINTENANCE_SECONDS", "1"),
        ],
    );
    let failure = wait_for_line(&lines, "partition maintenance failed");
    assert!(
        failure.contains("ERROR") && failure.contains("lock timeout"),
        "{failure}"
    );
    assert!(failure.contains("Ingest goes on"), "{failure}");
    let metrics_address = metrics_address(&logged);
    let failed = r#"krisp_partition_maintenance_total{outcome="failed"}"#;
    assert!(value(&scrape(metrics_address).await, failed) >= 1.0);

    // Ingest goes on meanwhile, unary and streamed.
    let app = TestApp::connect(address, db.clone()).await;
    record(&app, &participation, now + TimeDelta::seconds(1)).await;
    let item = proto::NewSentiment {
        started_at: Some(to_timestamp(now + TimeDelta::seconds(2))),
        ended_at: Some(to_timestamp(now + TimeDelta::seconds(3))),
        label: proto::SentimentLabel::Positive as i32,
        score: None,
    };
    app.stream_sentiments(&participation.id, vec![vec![item]])
        .await;

    // Once the lock is gone, a retry moves the row out of the default partition.
    blocker.rollback().await.unwrap();
    eventually(
        "the default partition is emptied by a retried maintenance",
        || {
            let db = db.clone();
            async move { count(&db, "SELECT count(*) FROM sentiments_default").await == 0 }
        },
    )
    .await;
    let ok = r#"krisp_partition_maintenance_total{outcome="ok"}"#;
    eventually("a successful round is counted", || async move {
        value(&scrape(metrics_address).await, ok) >= 1.0
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 3);
    drop(app);
    assert!(terminate(child, &lines).await.success());
}

#[tokio::test]
async fn stream_items_outside_the_clock_window_are_refused_by_index() {
    let db = fresh_database().await;
    let limits = Limits {
        item_clock: ItemClock {
            max_future: TimeDelta::minutes(15),
            max_age: Some(TimeDelta::days(30)),
        },
        ..Limits::default()
    };
    let app = spawn_app_with(db.clone(), limits).await;
    let now = Utc::now();
    let participation = participation_since(&app, now - TimeDelta::days(60)).await;
    let item = |at: chrono::DateTime<Utc>| proto::NewSentiment {
        started_at: Some(to_timestamp(at)),
        ended_at: Some(to_timestamp(at + TimeDelta::seconds(1))),
        label: proto::SentimentLabel::Positive as i32,
        score: None,
    };
    for (late, field, words) in [
        (
            now + TimeDelta::hours(2),
            "sentiments[2].started_at",
            "ahead of the server's clock",
        ),
        (
            now - TimeDelta::days(31),
            "sentiments[2].started_at",
            "31 days old",
        ),
        // Starts in the window, ends too far ahead.
        (
            now + TimeDelta::minutes(15),
            "sentiments[2].ended_at",
            "ahead of the server's clock",
        ),
    ] {
        let stream = frames::stream(
            &Uuid::new_v4().to_string(),
            &participation.id,
            vec![
                vec![item(now - TimeDelta::days(1)), item(now)],
                vec![item(late)],
            ],
        );
        let status = app
            .client
            .clone()
            .stream_sentiments(tokio_stream::iter(stream))
            .await
            .unwrap_err();
        let found = violations(&status);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, field);
        assert!(found[0].1.contains(words), "{found:?}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM ingest_streams").await, 0);
}
