//! A worker crashes and restarts (`pg_ctl restart -m immediate`) while client streams,
//! live feeds and unary records of users on it run: every call ends OK or with a status
//! that says retry, never INTERNAL, and the retries store everything exactly once.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use krisp_ingest::proto::{self, ingest_service_client::IngestServiceClient};
use sqlx::PgPool;
use tonic::{Code, Status, transport::Channel};
use uuid::Uuid;

use crate::{
    helpers::{TestApp, at, frames, sentiments, spawn_app_on, t0},
    live::{FeedCall, append, close, feed_rows},
    require_citus,
};

/// The statuses a client retries: the call was not done, and doing it again is safe.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
    ) || (status.code() == Code::ResourceExhausted && status.message().contains("retry"))
}

/// Every failed attempt of one test, to be judged at the end: (what, retryable, status);
/// and when its retries stop: set at its first failure, two minutes on.
#[derive(Clone, Default)]
pub(super) struct Failures(
    Arc<Mutex<Vec<(String, bool, String)>>>,
    Arc<std::sync::OnceLock<Instant>>,
);

impl Failures {
    fn note(&self, what: &str, status: &Status) {
        let described = format!("{:?}: {}", status.code(), status.message());
        self.0
            .lock()
            .unwrap()
            .push((what.to_owned(), retryable(status), described));
    }

    fn unretryable(&self) -> Vec<(String, bool, String)> {
        let failures = self.0.lock().unwrap();
        failures.iter().filter(|f| !f.1).cloned().collect()
    }

    /// Each distinct (what, status) seen, with how often.
    fn summary(&self) -> std::collections::BTreeMap<String, usize> {
        let mut seen = std::collections::BTreeMap::new();
        for (what, _, status) in self.0.lock().unwrap().iter() {
            *seen.entry(format!("{what}: {status}")).or_default() += 1;
        }
        seen
    }

    pub(super) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Notes `status` of a failed attempt and waits before the next; panics once the
    /// cluster has had long enough to recover, with every failure seen.
    async fn retry_after(&self, what: &str, status: &Status, pause: Duration) {
        self.note(what, status);
        assert!(
            Instant::now()
                < *self
                    .1
                    .get_or_init(|| Instant::now() + Duration::from_secs(120)),
            "{what} still fails after two minutes: {:#?}",
            self.0.lock().unwrap()
        );
        tokio::time::sleep(pause).await;
    }
}

/// Users whose shard is on the worker listening on `port`, until `on` of them, and `off`
/// elsewhere: each with a participation.
pub(super) async fn participations(
    app: &TestApp,
    db: &PgPool,
    port: u16,
    on: usize,
    off: usize,
) -> Vec<String> {
    let (mut here, mut there) = (Vec::new(), Vec::new());
    while here.len() < on || there.len() < off {
        let participation = app.participation().await;
        let node_port: i32 = sqlx::query_scalar(
            "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) \
             WHERE p.shardid = get_shard_id_for_distribution_column('users', $1::uuid)",
        )
        .bind(&participation.user_id)
        .fetch_one(db)
        .await
        .unwrap();
        if node_port == i32::from(port) && here.len() < on {
            here.push(participation.id);
        } else if node_port != i32::from(port) && there.len() < off {
            there.push(participation.id);
        }
    }
    here.extend(there);
    here
}

/// Streams of 2,000 sentiments for `participation_id`, each retried with its stream id
/// until it commits, until `stop`; returns (stream id, items) of each.
async fn streams(
    client: IngestServiceClient<Channel>,
    participation_id: String,
    stop: Arc<AtomicBool>,
    failures: Failures,
) -> Vec<(String, i64)> {
    let mut committed = Vec::new();
    let mut offset = 0;
    while !stop.load(Ordering::Relaxed) {
        let stream_id = Uuid::new_v4().to_string();
        let messages = frames::stream(
            &stream_id,
            &participation_id,
            vec![sentiments(offset, 2_000)],
        );
        loop {
            match client
                .clone()
                .stream_sentiments(tokio_stream::iter(messages.clone()))
                .await
            {
                Ok(reply) => {
                    assert_eq!(reply.into_inner().receipt.unwrap().items_stored, 2_000);
                    break;
                }
                Err(status) => {
                    let pause = Duration::from_millis(100);
                    failures
                        .retry_after("StreamSentiments", &status, pause)
                        .await;
                }
            }
        }
        committed.push((stream_id, 2_000));
        offset += 2_000;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    committed
}

/// Unary records with a request id each, retried until stored, until `stop`; returns
/// the request ids.
async fn records(
    client: IngestServiceClient<Channel>,
    participation_id: String,
    stop: Arc<AtomicBool>,
    failures: Failures,
) -> Vec<String> {
    let mut stored = Vec::new();
    let mut second = 1_000_000;
    while !stop.load(Ordering::Relaxed) {
        let request = proto::RecordSentimentRequest {
            participation_id: participation_id.clone(),
            sentiment: Some(proto::NewSentiment {
                started_at: at(t0(), second),
                ended_at: at(t0(), second + 1),
                label: proto::SentimentLabel::Neutral as i32,
                score: None,
            }),
            request_id: Uuid::new_v4().to_string(),
        };
        loop {
            match client.clone().record_sentiment(request.clone()).await {
                Ok(_) => break,
                Err(status) => {
                    let pause = Duration::from_millis(50);
                    failures
                        .retry_after("RecordSentiment", &status, pause)
                        .await;
                }
            }
        }
        stored.push(request.request_id);
        second += 1;
    }
    stored
}

/// A live feed appending batches of 20 until `stop`, reopened and resumed from its
/// committed position after every failure; returns the feed id and its last number.
async fn feed(
    channel: Channel,
    participation_id: String,
    stop: Arc<AtomicBool>,
    failures: Failures,
) -> (String, u64) {
    let feed_id = Uuid::new_v4().to_string();
    let mut sent = 0;
    'open: loop {
        let (mut call, committed) = loop {
            let mut call = FeedCall::start(
                channel.clone(),
                crate::live::open_message(&feed_id, &participation_id),
            )
            .await;
            match call.reply().await {
                Ok(proto::live_feed_response::Frame::Opened(opened)) => {
                    break (call, opened.committed_seq);
                }
                Ok(other) => panic!("expected Opened, got {other:?}"),
                Err(status) => {
                    let pause = Duration::from_millis(100);
                    failures.retry_after("LiveFeed open", &status, pause).await;
                }
            }
        };
        let mut next = committed + 1;
        loop {
            if stop.load(Ordering::Relaxed) && next > sent {
                match call.send(close(sent)).await {
                    Ok(proto::live_feed_response::Frame::Closed(_)) => return (feed_id, sent),
                    Ok(other) => panic!("expected Closed, got {other:?}"),
                    Err(status) => {
                        let pause = Duration::from_millis(100);
                        failures.retry_after("LiveFeed close", &status, pause).await;
                        continue 'open;
                    }
                }
            }
            match call.send(append(next, 20)).await {
                Ok(proto::live_feed_response::Frame::Ack(ack)) => {
                    next = ack.committed_through + 1;
                    sent = sent.max(ack.committed_through);
                }
                Ok(other) => panic!("expected Ack, got {other:?}"),
                Err(status) => {
                    let pause = Duration::from_millis(100);
                    failures
                        .retry_after("LiveFeed append", &status, pause)
                        .await;
                    continue 'open;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs streams, unary records and live feeds for `participations` (a third each), each
/// call retried until it succeeds, while `disturbance` runs, and three seconds after;
/// then checks that every failed attempt said to retry, and that every stream, record
/// and feed is stored exactly once. Returns the failed attempts, by kind and status.
pub(super) async fn ingest_through(
    app: &TestApp,
    db: &PgPool,
    participations: &[String],
    disturbance: impl std::future::Future<Output = ()>,
) -> Failures {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Failures::default();
    let mut stream_tasks = Vec::new();
    let mut record_tasks = Vec::new();
    let mut feed_tasks = Vec::new();
    for (i, participation_id) in participations.iter().enumerate() {
        let (client, stop, failures) = (app.client.clone(), stop.clone(), failures.clone());
        let participation_id = participation_id.clone();
        match i % 3 {
            0 => stream_tasks.push(tokio::spawn(streams(
                client,
                participation_id,
                stop,
                failures,
            ))),
            1 => record_tasks.push(tokio::spawn(records(
                client,
                participation_id,
                stop,
                failures,
            ))),
            _ => feed_tasks.push(tokio::spawn(feed(
                app.channel.clone(),
                participation_id,
                stop,
                failures,
            ))),
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    disturbance.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);

    let mut streamed = Vec::new();
    for task in stream_tasks {
        streamed.extend(task.await.unwrap());
    }
    let mut recorded = Vec::new();
    for task in record_tasks {
        recorded.extend(task.await.unwrap());
    }
    let mut fed = Vec::new();
    for task in feed_tasks {
        fed.push(task.await.unwrap());
    }

    assert!(
        failures.unretryable().is_empty(),
        "calls failed with a status that says not to retry: {:#?}",
        failures.unretryable(),
    );
    let stream_ids: Vec<Uuid> = streamed
        .iter()
        .map(|(id, _)| Uuid::parse_str(id).unwrap())
        .collect();
    let stored: std::collections::HashMap<Uuid, i64> = sqlx::query_as(
        "SELECT stream_id, count(*) FROM sentiments WHERE stream_id = ANY($1) GROUP BY 1",
    )
    .bind(&stream_ids)
    .fetch_all(db)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for ((stream_id, items), id) in streamed.iter().zip(&stream_ids) {
        assert_eq!(stored.get(id), Some(items), "stream {stream_id}");
    }
    let ids: Vec<Uuid> = recorded
        .iter()
        .map(|id| Uuid::parse_str(id).unwrap())
        .collect();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM sentiments WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(db)
        .await
        .unwrap();
    assert_eq!(stored, ids.len() as i64, "unary records");
    for (feed_id, last) in &fed {
        let last = *last as i64;
        assert_eq!(
            feed_rows(db, feed_id).await,
            (last, last, last),
            "feed {feed_id}"
        );
    }
    eprintln!(
        "{} streams, {} records, {} feeds; {} failed attempts, all retryable: {:#?}",
        streamed.len(),
        recorded.len(),
        fed.len(),
        failures.len(),
        failures.summary()
    );
    failures
}

#[tokio::test]
async fn a_worker_crash_fails_calls_retryably_and_retries_store_exactly_once() {
    let cluster = require_citus!();
    let _alone = cluster.exclusive().await;
    let db = cluster.shared_database().await;
    let app = spawn_app_on(db.clone()).await;
    let worker = 1;
    let participations = participations(&app, &db, cluster.port(worker), 6, 3).await;
    let restart = async {
        let restart = tokio::task::spawn_blocking(move || cluster.restart_worker(worker));
        restart.await.unwrap();
        cluster.wait_until_healthy(&db).await;
    };
    let failures = ingest_through(&app, &db, &participations, restart).await;
    assert!(
        failures.len() > 0,
        "the restart failed no call: it did not test anything\n{}",
        cluster.logged_errors(0)
    );
}
