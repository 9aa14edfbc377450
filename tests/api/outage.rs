//! PostgreSQL stops in the middle of many concurrent streams (a private cluster this test
//! starts, stops and starts again): every acknowledged stream is whole, every other one is
//! absent and got a retryable status, health follows the database, and the service
//! serves again without a restart. Unary records too: UNAVAILABLE while the database is
//! down, stored once it is back, from the first call on (the connections that broke
//! while idle are noticed before a call uses them).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use krisp_ingest::{
    config::Limits,
    local_postgres::{self, LocalPostgres},
    proto::{self, ingest_service_client::IngestServiceClient},
    storage,
};
use sqlx::postgres::PgPoolOptions;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use uuid::Uuid;

use crate::helpers::{frames, fresh_data_dir, sentiments, spawn_app_with};

const STREAMERS: usize = 8;
const BATCHES: usize = 4;
const BATCH: usize = 250;

struct Attempt {
    stream_id: String,
    messages: Vec<proto::StreamSentimentsRequest>,
    outcome: Result<proto::StreamReceipt, Code>,
}

async fn health(channel: &Channel) -> Option<ServingStatus> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "krisp.ingest.v1.IngestService".into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

async fn wait_for_health(channel: &Channel, wanted: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(channel).await != Some(wanted) {
        assert!(Instant::now() < deadline, "health never became {wanted:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Streams one small stream after another for `participation_id` until `stop`.
async fn streamer(
    mut client: IngestServiceClient<Channel>,
    participation_id: String,
    offset: i64,
    stop: Arc<AtomicBool>,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut next = offset;
    while !stop.load(Ordering::Relaxed) && attempts.len() < 500 {
        let stream_id = Uuid::new_v4().to_string();
        let batches = (0..BATCHES)
            .map(|b| sentiments(next + (b * BATCH) as i64, BATCH))
            .collect();
        next += (BATCHES * BATCH) as i64;
        let messages = frames::stream(&stream_id, &participation_id, batches);
        let outcome = client
            .stream_sentiments(tokio_stream::iter(messages.clone()))
            .await
            .map(|r| r.into_inner().receipt.unwrap_or_default())
            .map_err(|status| status.code());
        let failed = outcome.is_err();
        attempts.push(Attempt {
            stream_id,
            messages,
            outcome,
        });
        if failed {
            // A client backs off before it sends the next stream.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    attempts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_nothing_and_duplicates_nothing() {
    let (_root, data_dir) = fresh_data_dir();
    let cluster = LocalPostgres::ensure(&data_dir).await.unwrap();
    let options = cluster.connect_options(local_postgres::DATABASE);
    let pool = krisp_ingest::app::pool_options(16)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(options.clone())
        .await
        .unwrap();
    storage::migrate(&pool).await.unwrap();
    let app = spawn_app_with(pool, Limits::default()).await;
    wait_for_health(&app.channel, ServingStatus::Serving).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut streamers = Vec::new();
    for i in 0..STREAMERS {
        let participation = app.participation().await;
        let client = IngestServiceClient::new(crate::helpers::connect(app.address).await);
        streamers.push(tokio::spawn(streamer(
            client,
            participation.id,
            (i * 1_000_000) as i64,
            Arc::clone(&stop),
        )));
    }

    // A unary record before the fault, so that its writer holds a connection.
    let recorded = app.participation().await;
    let record = |i: i64| {
        let mut client = app.client.clone();
        let request = proto::RecordSentimentRequest {
            request_id: Uuid::new_v4().to_string(),
            participation_id: recorded.id.clone(),
            sentiment: sentiments(i * 1_000, 1).pop(),
        };
        async move { client.record_sentiment(request).await }
    };
    record(0).await.unwrap();

    // Load, then the fault: PostgreSQL stops (fast shutdown) under the streams.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.stop().await.unwrap();
    wait_for_health(&app.channel, ServingStatus::NotServing).await;
    let refused = record(1).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // PostgreSQL comes back; the service must serve again without a restart.
    let cluster = LocalPostgres::ensure(&data_dir).await.unwrap();
    let back = Instant::now();
    let mut client = app.client.clone();
    loop {
        let call = client.list_timezones(proto::ListTimezonesRequest {}).await;
        if call.is_ok() {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "not serving 10 s after the database came back: {call:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_health(&app.channel, ServingStatus::Serving).await;
    // The writers' and the pool's connections broke with the database: they are tested
    // before use after being idle, so the first calls once health says SERVING succeed.
    let stored_after = record(2)
        .await
        .expect("the first record after the database is back")
        .into_inner()
        .sentiment
        .expect("a sentiment");
    let first_stream = Uuid::new_v4().to_string();
    app.client
        .clone()
        .stream_sentiments(tokio_stream::iter(frames::stream(
            &first_stream,
            &recorded.id,
            vec![sentiments(5_000, 10)],
        )))
        .await
        .expect("the first stream after the database is back");
    // And every one after it: no writer is left with a broken connection.
    for i in 100..106 {
        record(i).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut attempts = Vec::new();
    for streamer in streamers {
        attempts.extend(streamer.await.unwrap());
    }

    let check = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap();
    // The unary records answered OK are stored, and only those.
    let unary: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM sentiments WHERE participation_id = $1 AND stream_id IS NULL",
    )
    .bind(Uuid::parse_str(&recorded.id).unwrap())
    .fetch_all(&check)
    .await
    .unwrap();
    assert_eq!(unary.len(), 2 + 6, "{unary:?}");
    let first_stream_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sentiments WHERE stream_id = $1")
            .bind(Uuid::parse_str(&first_stream).unwrap())
            .fetch_one(&check)
            .await
            .unwrap();
    assert_eq!(first_stream_rows, 10);
    assert!(unary.contains(&Uuid::parse_str(&stored_after.id).unwrap()));
    let stored = |stream_id: String| {
        let check = check.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sentiments WHERE stream_id = $1")
                .bind(Uuid::parse_str(&stream_id).unwrap())
                .fetch_one(&check)
                .await
                .unwrap()
        }
    };
    let items = (BATCHES * BATCH) as i64;
    let (mut acknowledged, mut failed) = (0, 0);
    for attempt in &attempts {
        let rows = stored(attempt.stream_id.clone()).await;
        match &attempt.outcome {
            Ok(receipt) => {
                acknowledged += 1;
                assert_eq!(receipt.items_stored as i64, items);
                assert_eq!(
                    rows, items,
                    "acknowledged stream {} is not whole",
                    attempt.stream_id
                );
            }
            Err(code) => {
                failed += 1;
                assert!(
                    matches!(code, Code::Unavailable | Code::Aborted),
                    "stream {} failed with non-retryable {code:?}",
                    attempt.stream_id
                );
                assert_eq!(rows, 0, "failed stream {} left rows", attempt.stream_id);
            }
        }
    }
    assert!(
        acknowledged > 0 && failed > 0,
        "the fault must hit a load: {acknowledged} ok, {failed} failed"
    );

    // Retrying every failed stream (as a client should) stores each exactly once.
    let mut client = app.client.clone();
    for attempt in attempts.iter().filter(|a| a.outcome.is_err()) {
        // The retry commits (a failed stream had not); once more is a replay that
        // stores nothing again.
        for replayed in [false, true] {
            let receipt = client
                .stream_sentiments(tokio_stream::iter(attempt.messages.clone()))
                .await
                .unwrap()
                .into_inner()
                .receipt
                .unwrap();
            assert_eq!(receipt.replayed, replayed, "{}", attempt.stream_id);
        }
    }
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sentiments WHERE stream_id IS NOT NULL")
            .fetch_one(&check)
            .await
            .unwrap();
    assert_eq!(
        total,
        attempts.len() as i64 * items + first_stream_rows,
        "rows lost or duplicated"
    );
    let idle_in_transaction: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
    )
    .fetch_one(&check)
    .await
    .unwrap();
    assert_eq!(idle_in_transaction, 0);
    eprintln!(
        "outage: {} streams tried, 1 fault injected (fast shutdown of PostgreSQL), {acknowledged} \
         acknowledged, {failed} failed and retried, rows lost 0, duplicates 0",
        attempts.len()
    );
    check.close().await;
    drop(app);
    cluster.stop().await.unwrap();
}
