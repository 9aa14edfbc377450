//! Every limit, provoked for real: what the client sees, and that nothing is stored.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use krisp_ingest::{
    config::Limits,
    proto::{self, ingest_service_client::IngestServiceClient},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::helpers::{
    BULK_ITEMS, TestApp, connect, count, eventually, frames, fresh_database, open_transactions,
    sentiments, spawn_app_with, writing_limits,
};

async fn app_with(limits: Limits) -> TestApp {
    spawn_app_with(fresh_database().await, limits).await
}

#[tokio::test]
async fn an_oversized_message_is_refused_with_resource_exhausted() {
    let app = app_with(Limits {
        max_message_bytes: 64 * 1024,
        ..Limits::default()
    })
    .await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    // ~3,000 sentiments are well over 64 KiB in one message.
    let messages = frames::stream(
        &stream_id,
        &participation.id,
        vec![sentiments(0, 10), sentiments(10, 3000)],
    );
    let status = app
        .client
        .clone()
        .stream_sentiments(tokio_stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);

    let status = app
        .client
        .clone()
        .create_user(proto::CreateUserRequest {
            external_id: "x".repeat(100_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(count(&app.db, "SELECT count(*) FROM users").await, 1);
}

#[tokio::test]
async fn a_stream_over_the_item_limit_stores_nothing() {
    let app = app_with(Limits {
        max_stream_items: 100,
        ..Limits::default()
    })
    .await;
    let participation = app.participation().await;
    let over = frames::stream(
        &Uuid::new_v4().to_string(),
        &participation.id,
        vec![sentiments(0, 60), sentiments(60, 60)],
    );
    let status = app
        .client
        .clone()
        .stream_sentiments(tokio_stream::iter(over))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("100 items"),
        "{}",
        status.message()
    );
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    // Exactly at the limit is fine.
    let at = frames::stream(
        &Uuid::new_v4().to_string(),
        &participation.id,
        vec![sentiments(0, 100)],
    );
    app.client
        .clone()
        .stream_sentiments(tokio_stream::iter(at))
        .await
        .unwrap();
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 100);
}

#[tokio::test]
async fn a_stream_open_too_long_is_cut_and_stores_nothing() {
    let app = app_with(Limits {
        max_stream_duration: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let participation = app.participation().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(frames::header(
        &Uuid::new_v4().to_string(),
        &participation.id,
    ))
    .await
    .unwrap();
    tx.send(frames::batch(sentiments(0, 500))).await.unwrap();
    // The client never finishes: the server cuts the stream at its limit.
    let status = app
        .client
        .clone()
        .stream_sentiments(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("longer than"),
        "{}",
        status.message()
    );
    drop(tx);
    eventually("the stream's transaction ends", || async {
        open_transactions(&app.db).await == 0
    })
    .await;
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
}

/// Waits until `n` backends of the server wait for a lock the test holds.
async fn waiting_on_the_lock(db: &sqlx::PgPool, n: i64) {
    eventually(&format!("{n} calls wait on the test's lock"), || async {
        count(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .await
            == n
    })
    .await;
}

fn assert_shed(status: &tonic::Status) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status
        .get_error_details()
        .retry_info()
        .cloned()
        .unwrap_or_else(|| panic!("no RetryInfo detail: {status:?}"));
    assert!(
        retry.retry_delay.is_some_and(|d| d > Duration::ZERO),
        "{retry:?}"
    );
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_are_shed_with_retry_info() {
    let app = app_with(Limits {
        max_concurrent_calls: 1,
        max_open_streams: 1,
        ..Limits::default()
    })
    .await;
    let participation = app.participation().await;
    // Calls that read participations wait while the test holds this lock.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE participations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    // One stream holds the only stream slot (it waits on the lock to look up its
    // participation).
    let (tx, rx) = mpsc::channel(4);
    let stream_id = Uuid::new_v4().to_string();
    tx.send(frames::header(&stream_id, &participation.id))
        .await
        .unwrap();
    let mut client = app.client.clone();
    let call = tokio::spawn(async move { client.stream_sentiments(ReceiverStream::new(rx)).await });
    waiting_on_the_lock(&app.db, 1).await;
    let second = app
        .client
        .clone()
        .stream_sentiments(tokio_stream::iter(frames::stream(
            &Uuid::new_v4().to_string(),
            &participation.id,
            vec![sentiments(0, 1)],
        )))
        .await
        .unwrap_err();
    assert_shed(&second);
    // Open streams do not count against the other calls.
    let users_before = count(&app.db, "SELECT count(*) FROM users").await;
    app.client
        .clone()
        .create_user(proto::CreateUserRequest {
            external_id: "admitted".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A unary call holds the only call slot (it waits on the lock too).
    let mut client = app.client.clone();
    let participation_id = participation.id.clone();
    let lookup = tokio::spawn(async move {
        client
            .get_participation(proto::GetParticipationRequest { participation_id })
            .await
    });
    waiting_on_the_lock(&app.db, 2).await;
    let status = app
        .client
        .clone()
        .create_user(proto::CreateUserRequest {
            external_id: "shed".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_shed(&status);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM users").await,
        users_before + 1
    );

    // Once the slots are free again, calls go through.
    lock.rollback().await.unwrap();
    lookup.await.unwrap().unwrap();
    tx.send(frames::batch(sentiments(0, 5))).await.unwrap();
    tx.send(frames::trailer(5)).await.unwrap();
    drop(tx);
    let receipt = call.await.unwrap().unwrap().into_inner().receipt.unwrap();
    assert_eq!(receipt.items_stored, 5);
    app.client
        .clone()
        .create_user(proto::CreateUserRequest {
            external_id: "after".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_client_deadline_rolls_the_stream_back() {
    let app = app_with(Limits::default()).await;
    let participation = app.participation().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(frames::header(
        &Uuid::new_v4().to_string(),
        &participation.id,
    ))
    .await
    .unwrap();
    tx.send(frames::batch(sentiments(0, 2500))).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.set_timeout(Duration::from_millis(500));
    let status = app
        .client
        .clone()
        .stream_sentiments(request)
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    drop(tx);
    eventually("the stream's transaction ends", || async {
        open_transactions(&app.db).await == 0
    })
    .await;
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
}

/// A TCP proxy that can freeze: it stops moving bytes but keeps both sockets open, like
/// a peer whose machine died without closing its connections.
async fn freezable_proxy(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let freeze = Arc::clone(&frozen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(target).await.unwrap();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                let frozen = Arc::clone(&freeze);
                tokio::spawn(async move {
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        while frozen.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Keep the sockets open while frozen, as a dead peer would.
                    while frozen.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
        }
    });
    (address, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_drops_a_dead_peer_and_its_stream_stores_nothing() {
    let app = app_with(Limits {
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(500),
        ..writing_limits()
    })
    .await;
    let participation = app.participation().await;
    let (proxy, frozen) = freezable_proxy(app.address).await;
    let mut client = IngestServiceClient::new(connect(proxy).await);
    let (tx, rx) = mpsc::channel(4);
    tx.send(frames::header(
        &Uuid::new_v4().to_string(),
        &participation.id,
    ))
    .await
    .unwrap();
    // A bulk upload: written as it arrives, so its transaction is open.
    tx.send(frames::batch(sentiments(0, BULK_ITEMS)))
        .await
        .unwrap();
    let call = tokio::spawn(async move { client.stream_sentiments(ReceiverStream::new(rx)).await });
    eventually("the stream is open", || async {
        open_transactions(&app.db).await > 0
    })
    .await;

    // The peer goes silent. The stream's own limit (4 h) and its writer idle (a minute)
    // are far away: only keepalive can end this transaction within the wait below.
    frozen.store(true, Ordering::Relaxed);
    eventually("the server drops the dead peer's stream", || async {
        open_transactions(&app.db).await == 0
    })
    .await;
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    call.abort();
    drop(tx);
}

#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument() {
    // A message shaped like CreateUserRequest whose external_id is not UTF-8.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawCreateUser {
        #[prost(bytes = "vec", tag = "1")]
        external_id: Vec<u8>,
    }
    let app = app_with(Limits::default()).await;
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/krisp.ingest.v1.IngestService/CreateUser");
    let codec = tonic_prost::ProstCodec::<RawCreateUser, proto::CreateUserResponse>::default();
    let status = grpc
        .unary(
            tonic::Request::new(RawCreateUser {
                external_id: vec![0xff, 0xfe, 0x00],
            }),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(count(&app.db, "SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_timeline_being_streamed_holds_its_slot_until_its_last_message() {
    let app = app_with(Limits {
        max_concurrent_calls: 1,
        ..Limits::default()
    })
    .await;
    let participation = app.participation().await;
    // More than the server's HTTP/2 send buffer and the client's window hold together.
    app.stream_sentiments(&participation.id, vec![sentiments(0, 50_000)])
        .await;
    // A client that reads one entry of the timeline, then stops reading: HTTP/2 flow
    // control keeps the rest of the response pending on the server.
    let mut reader = IngestServiceClient::new(connect(app.address).await);
    let mut timeline = reader
        .get_timeline(proto::GetTimelineRequest {
            participation_id: participation.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(timeline.message().await.unwrap().is_some());
    let get_user = || {
        let mut client = app.client.clone();
        let user_id = participation.user_id.clone();
        async move { client.get_user(proto::GetUserRequest { user_id }).await }
    };
    let status = get_user().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // The reader goes away: the slot is free again.
    drop(timeline);
    eventually("the slot is released", || async {
        get_user().await.is_ok()
    })
    .await;
}

/// Streams never take the connections unary calls need: with a pool of 4, streams hold
/// at most 3; a 4th waits (reading nothing), a unary call still answers at once, and a
/// stream whose deadline passes while it waits gets RESOURCE_EXHAUSTED with RetryInfo.
/// A server over a pool of four connections (three for streams to write with).
async fn app_on_four_connections(limits: Limits) -> TestApp {
    let db = fresh_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with((*db.connect_options()).clone())
        .await
        .unwrap();
    spawn_app_with(pool, limits).await
}

/// Opens a stream with its header and one batch of `items`, leaving it open.
async fn open_stream(
    app: &TestApp,
    participation_id: &str,
    items: Vec<proto::NewSentiment>,
) -> (
    mpsc::Sender<proto::StreamSentimentsRequest>,
    tokio::task::JoinHandle<
        Result<tonic::Response<proto::StreamSentimentsResponse>, tonic::Status>,
    >,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(frames::header(
        &Uuid::new_v4().to_string(),
        participation_id,
    ))
    .await
    .unwrap();
    tx.send(frames::batch(items)).await.unwrap();
    let mut client = app.client.clone();
    let call = tokio::spawn(async move { client.stream_sentiments(ReceiverStream::new(rx)).await });
    (tx, call)
}

#[tokio::test]
async fn silent_streams_hold_no_connection_and_leave_unary_calls_alone() {
    let app = app_on_four_connections(Limits::default()).await;
    let participation = app.participation().await;
    let mut open = Vec::new();
    for i in 0..16 {
        open.push(open_stream(&app, &participation.id, sentiments(10 * i, 2)).await);
    }
    // Sixteen silent streams on a pool of four: none holds a connection or transaction.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(open_transactions(&app.db).await, 0);
    let mut request = tonic::Request::new(proto::GetUserRequest {
        user_id: participation.user_id.clone(),
    });
    request.set_timeout(Duration::from_secs(2));
    app.client.clone().get_user(request).await.unwrap();
    crate::helpers::assert_serving(&app.channel).await;
    for (tx, call) in open {
        tx.send(frames::trailer(2)).await.unwrap();
        drop(tx);
        let receipt = call.await.unwrap().unwrap().into_inner().receipt.unwrap();
        assert_eq!(receipt.items_stored, 2);
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 32);
}

#[tokio::test]
async fn a_stream_that_cannot_get_a_writer_before_its_deadline_is_resource_exhausted() {
    let app = app_on_four_connections(writing_limits()).await;
    let participation = app.participation().await;
    // Three bulk uploads hold the three connections streams may write with.
    let mut open = Vec::new();
    for i in 0..3 {
        let items = sentiments(i * BULK_ITEMS as i64, BULK_ITEMS);
        open.push(open_stream(&app, &participation.id, items).await);
    }
    eventually("three streams hold a connection", || async {
        open_transactions(&app.db).await == 3
    })
    .await;
    let mut request = tonic::Request::new(tokio_stream::iter(frames::stream(
        &Uuid::new_v4().to_string(),
        &participation.id,
        vec![sentiments(100_000, 5)],
    )));
    request.set_timeout(Duration::from_millis(1500));
    let status = app
        .client
        .clone()
        .stream_sentiments(request)
        .await
        .unwrap_err();
    assert_shed(&status);
    // Unary calls still have their share of the pool.
    app.client
        .clone()
        .get_user(proto::GetUserRequest {
            user_id: participation.user_id.clone(),
        })
        .await
        .unwrap();
    for (tx, call) in open {
        tx.send(frames::trailer(BULK_ITEMS as u64)).await.unwrap();
        drop(tx);
        let receipt = call.await.unwrap().unwrap().into_inner().receipt.unwrap();
        assert_eq!(receipt.items_stored, BULK_ITEMS as u64);
    }
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM sentiments").await,
        3 * BULK_ITEMS as i64
    );
}
