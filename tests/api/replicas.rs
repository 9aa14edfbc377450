//! Stateless replicas: three instances of the service over one PostgreSQL, a client that
//! balances across them, a stream id replayed to two replicas at the same moment, and
//! connections recycled by their maximum age.

use std::{net::SocketAddr, time::Duration};

use krisp_ingest::{
    app::pool_options,
    config::Limits,
    proto::{self, ingest_service_client::IngestServiceClient},
};
use sqlx::{PgPool, postgres::PgConnectOptions};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use crate::helpers::{
    BULK_ITEMS, TestApp, connect, count, eventually, frames, fresh_database, open_transactions,
    sentiments, spawn_app_configured, writing_limits,
};

/// A replica: its own pool (tagged with its name) and its own listener; the returned
/// client's `db` is the test's view of the shared database.
async fn replica(db: &PgPool, name: &str, limits: Limits) -> TestApp {
    let options: PgConnectOptions = (*db.connect_options()).clone().application_name(name);
    let pool = pool_options(16).connect_with(options).await.unwrap();
    let replica = spawn_app_configured(pool, |settings| settings.limits = limits).await;
    TestApp {
        db: db.clone(),
        ..replica
    }
}

/// Records which replica (application_name) committed each stream.
async fn audit_replicas(db: &PgPool) {
    for statement in [
        "CREATE TABLE stream_replicas (stream_id uuid, replica text)",
        "CREATE FUNCTION stream_replica() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           INSERT INTO stream_replicas VALUES (NEW.stream_id, \
             current_setting('application_name')); \
           RETURN NULL; \
         END $$",
        "CREATE TRIGGER stream_replica AFTER INSERT ON ingest_streams \
         FOR EACH ROW EXECUTE FUNCTION stream_replica()",
    ] {
        sqlx::query(statement).execute(db).await.unwrap();
    }
}

type Call = tokio::task::JoinHandle<Result<proto::StreamReceipt, tonic::Status>>;

/// A stream on `channel` whose messages the test sends.
fn open_stream(channel: Channel) -> (mpsc::Sender<proto::StreamSentimentsRequest>, Call) {
    let (tx, rx) = mpsc::channel(16);
    let call = tokio::spawn(async move {
        IngestServiceClient::new(channel)
            .stream_sentiments(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().receipt.unwrap())
    });
    (tx, call)
}

#[tokio::test]
async fn three_replicas_share_the_load_and_a_stream_id_commits_once_across_them() {
    let db = fresh_database().await;
    audit_replicas(&db).await;
    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b", "replica-c"] {
        replicas.push(replica(&db, name, writing_limits()).await);
    }
    let addresses: Vec<SocketAddr> = replicas.iter().map(|r| r.address).collect();
    let setup = &replicas[0];

    // One channel balancing over the three (tonic's p2c balancer).
    let balanced = Channel::balance_list(addresses.iter().map(|a| {
        Endpoint::from_shared(format!("http://{a}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
    }));
    let streams = 30;
    let mut calls = Vec::new();
    let mut participations = Vec::new();
    for i in 0..streams {
        let participation = setup.participation().await;
        let stream = frames::stream(
            &Uuid::new_v4().to_string(),
            &participation.id,
            vec![sentiments(0, 500), sentiments(500, 500 + i)],
        );
        let mut client = IngestServiceClient::new(balanced.clone());
        calls.push(tokio::spawn(async move {
            client.stream_sentiments(tokio_stream::iter(stream)).await
        }));
        participations.push(participation);
    }
    for call in calls {
        let receipt = call.await.unwrap().unwrap().into_inner().receipt.unwrap();
        assert!(!receipt.replayed);
    }
    let expected: i64 = (0..streams).map(|i| 1000 + i as i64).sum();
    assert_eq!(
        count(&db, "SELECT count(*) FROM sentiments").await,
        expected
    );
    let per_replica: Vec<(String, i64)> = sqlx::query_as(
        "SELECT replica, count(*) FROM stream_replicas GROUP BY replica ORDER BY replica",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    println!("streams committed per replica: {per_replica:?}");
    assert_eq!(
        per_replica.len(),
        3,
        "every replica served: {per_replica:?}"
    );
    assert_eq!(per_replica.iter().map(|r| r.1).sum::<i64>(), streams as i64);

    // The same stream id sent to two replicas at the same moment.
    let participation = &participations[0];
    let stream_id = Uuid::new_v4().to_string();
    let (a, call_a) = open_stream(connect(addresses[1]).await);
    let (b, call_b) = open_stream(connect(addresses[2]).await);
    for tx in [&a, &b] {
        tx.send(frames::header(&stream_id, &participation.id))
            .await
            .unwrap();
        // A bulk batch: each replica writes it as it arrives, claiming the stream id.
        tx.send(frames::batch(sentiments(2000, BULK_ITEMS)))
            .await
            .unwrap();
    }
    // One replica holds the claim of the stream id; the other waits on it.
    eventually(
        "one replica waits for the other's claim of the stream id",
        || async {
            count(
                &db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
            )
            .await
                == 1
        },
    )
    .await;
    for tx in [&a, &b] {
        tx.send(frames::trailer(BULK_ITEMS as u64)).await.unwrap();
    }
    drop((a, b));
    let first = call_a.await.unwrap().unwrap();
    let second = call_b.await.unwrap().unwrap();
    println!("replay across replicas: {first:?} / {second:?}");
    assert_eq!(
        [first.replayed, second.replayed]
            .iter()
            .filter(|r| **r)
            .count(),
        1,
        "exactly one commit: {first:?} {second:?}"
    );
    assert_eq!(first.stream_id, second.stream_id);
    assert_eq!(first.items_stored, BULK_ITEMS as u64);
    assert_eq!(first.items_stored, second.items_stored);
    assert_eq!(first.committed_at, second.committed_at);
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM sentiments WHERE stream_id = '{stream_id}'")
        )
        .await,
        BULK_ITEMS as i64
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM sentiments").await,
        expected + BULK_ITEMS as i64
    );
}

fn aging(age: Duration, grace: Duration) -> Limits {
    Limits {
        max_connection_age: Some(age),
        max_connection_age_jitter_percent: 0,
        max_connection_age_grace: grace,
        ..writing_limits()
    }
}

#[tokio::test]
async fn a_stream_cut_by_the_connection_age_rolls_back_and_its_retry_commits_once() {
    let db = fresh_database().await;
    let setup = replica(
        &db,
        "aging",
        aging(Duration::from_secs(1), Duration::from_secs(1)),
    )
    .await;
    let address = setup.address;
    let participation = setup.participation().await;
    let stream_id = Uuid::new_v4().to_string();

    // A stream that outlives its connection's age and grace.
    let channel = connect(address).await;
    let (tx, call) = open_stream(channel.clone());
    tx.send(frames::header(&stream_id, &participation.id))
        .await
        .unwrap();
    tx.send(frames::batch(sentiments(0, BULK_ITEMS)))
        .await
        .unwrap();
    eventually(
        "the server writes rows in the stream's transaction",
        || async { open_transactions(&db).await == 1 },
    )
    .await;
    let status = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the connection is closed after age + grace")
        .unwrap()
        .unwrap_err();
    println!("stream cut by the connection age: {status:?}");
    drop(tx);
    eventually("the cut stream's transaction is rolled back", || async {
        open_transactions(&db).await == 0
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM ingest_streams").await, 0);

    // The retry, with the same stream id, on the same channel (which reconnects).
    let retry = || {
        let mut client = IngestServiceClient::new(channel.clone());
        let stream = frames::stream(
            &stream_id,
            &participation.id,
            vec![sentiments(0, BULK_ITEMS)],
        );
        async move {
            client
                .stream_sentiments(tokio_stream::iter(stream))
                .await
                .unwrap()
                .into_inner()
                .receipt
                .unwrap()
        }
    };
    let first = retry().await;
    assert!(!first.replayed);
    let again = retry().await;
    assert!(again.replayed, "{again:?}");
    assert_eq!(again.committed_at, first.committed_at);
    assert_eq!(
        count(&db, "SELECT count(*) FROM sentiments").await,
        BULK_ITEMS as i64
    );
}

#[tokio::test]
async fn a_stream_that_ends_within_the_grace_commits_though_its_connection_aged_out() {
    let db = fresh_database().await;
    let setup = replica(
        &db,
        "aging",
        aging(Duration::from_millis(500), Duration::from_secs(10)),
    )
    .await;
    let address = setup.address;
    let participation = setup.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let channel = connect(address).await;
    let (tx, call) = open_stream(channel.clone());
    tx.send(frames::header(&stream_id, &participation.id))
        .await
        .unwrap();
    // Four batches over 2 s: the connection reaches its age (0.5 s) in the middle.
    for i in 0..4 {
        tx.send(frames::batch(sentiments(i * 1000, 1000)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tx.send(frames::trailer(4000)).await.unwrap();
    drop(tx);
    let receipt = call.await.unwrap().unwrap();
    assert_eq!(receipt.items_stored, 4000);
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 4000);
    // And the channel goes on, over a new connection.
    let mut client = IngestServiceClient::new(channel);
    client
        .list_timezones(proto::ListTimezonesRequest::default())
        .await
        .unwrap();
}
