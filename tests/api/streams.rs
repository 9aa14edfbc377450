//! Client streams: one transaction each, all or nothing.

use krisp_ingest::proto::{self, ingest_service_client::IngestServiceClient};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::helpers::{
    BULK_ITEMS, TestApp, at, connect, count, eventually, frames, leave, refuse_sentiments_scored,
    sentiments, spawn_app, spawn_writing_app, t0, violated_fields,
};

async fn send(
    app: &TestApp,
    messages: Vec<proto::StreamSentimentsRequest>,
) -> Result<proto::StreamReceipt, Status> {
    app.client
        .clone()
        .stream_sentiments(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner().receipt.unwrap())
}

async fn stored_for(db: &PgPool, stream_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sentiments WHERE stream_id = $1")
        .bind(Uuid::parse_str(stream_id).unwrap())
        .fetch_one(db)
        .await
        .unwrap()
}

/// Backends of the test database (other than ours) that hold a lock on `sentiments`:
/// a stream's open transaction that has written rows.
async fn writers(db: &PgPool) -> i64 {
    count(
        db,
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
           AND l.relation = 'sentiments'::regclass",
    )
    .await
}

#[tokio::test]
async fn a_stream_commits_every_item_and_returns_a_receipt() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    // More items than one flush, in uneven batches.
    let batches: Vec<_> = (0..8).map(|b| sentiments(b * 700, 700)).collect();
    let receipt = send(&app, frames::stream(&stream_id, &participation.id, batches))
        .await
        .unwrap();
    assert_eq!(receipt.stream_id, stream_id);
    assert_eq!(receipt.items_stored, 5600);
    assert!(!receipt.replayed);
    assert!(receipt.committed_at.is_some());
    assert_eq!(stored_for(&app.db, &stream_id).await, 5600);
    let recorded: (i64, String) =
        sqlx::query_as("SELECT items_stored, kind FROM ingest_streams WHERE stream_id = $1")
            .bind(Uuid::parse_str(&stream_id).unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(recorded, (5600, "sentiments".to_owned()));
}

#[tokio::test]
async fn a_replayed_stream_returns_the_first_receipt_and_stores_nothing_again() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let messages = frames::stream(&stream_id, &participation.id, vec![sentiments(0, 300)]);
    let first = send(&app, messages.clone()).await.unwrap();
    for _ in 0..3 {
        let again = send(&app, messages.clone()).await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.items_stored, first.items_stored);
        assert_eq!(again.committed_at, first.committed_at);
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 300);

    // The same id for another participation of the same user is a conflict.
    let mut client = app.client.clone();
    let session = app.create_session(t0()).await;
    client
        .leave_session(proto::LeaveSessionRequest {
            participation_id: participation.id.clone(),
            disconnected_at: at(t0(), 1000),
            talked_time: Some(prost_types::Duration::default()),
            microphone_used: false,
            speaker_used: false,
        })
        .await
        .unwrap();
    let user = crate::helpers::fetch_user(&mut client, &participation.user_id.clone()).await;
    let other = app
        .join(&user, &session, t0() + chrono::TimeDelta::seconds(2000))
        .await
        .unwrap();
    let status = send(
        &app,
        frames::stream(&stream_id, &other.id, vec![sentiments(2000, 1)]),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 300);
}

#[tokio::test]
async fn an_invalid_item_in_the_middle_stores_nothing_and_names_its_index() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let mut third = sentiments(3000, 1000);
    // Stream-wide index 3141: ends before it starts.
    third[141].ended_at = at(t0(), 0);
    let batches = vec![
        sentiments(0, 1500),
        sentiments(1500, 1500),
        third,
        sentiments(4000, 500),
    ];
    let status = send(&app, frames::stream(&stream_id, &participation.id, batches))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["sentiments[3141].ended_at"]);
    assert!(
        status.message().contains("sentiments[3141].ended_at"),
        "{}",
        status.message()
    );
    // 3000 rows had been written inside the transaction before the bad item.
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM ingest_streams").await,
        0
    );
}

#[tokio::test]
async fn an_item_outside_the_participation_stores_nothing() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let batches = vec![sentiments(0, 2500), sentiments(-10, 1)];
    let status = send(
        &app,
        frames::stream(&Uuid::new_v4().to_string(), &participation.id, batches),
    )
    .await
    .unwrap_err();
    assert_eq!(violated_fields(&status), ["sentiments[2500].started_at"]);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
}

/// A stream checks its items against its participation as it began; a leave while the
/// stream is open is taken in when the stream writes (it holds the participation from
/// then to its commit): items past the leave are refused, the latest one named, and
/// nothing is stored.
#[tokio::test]
async fn a_leave_while_a_stream_is_open_refuses_its_items_past_the_leave() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = open_stream(&app).await;
    tx.send(frames::header(&stream_id, &participation.id))
        .await
        .unwrap();
    // Items from 100 s to 103 s, the latest (index 2) ending last.
    tx.send(frames::batch(sentiments(100, 3))).await.unwrap();
    // The server reads the header (and the participation, open) before the leave.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    app.client
        .clone()
        .leave_session(leave(&participation.id, 102, 0))
        .await
        .expect("nothing is stored yet, so the leave is taken");
    tx.send(frames::trailer(3)).await.unwrap();
    drop(tx);

    let status = call.await.unwrap().unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["sentiments[2].ended_at"],
        "{status:?}"
    );
    assert_eq!(stored_for(&app.db, &stream_id).await, 0);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM ingest_streams").await,
        0
    );
}

/// Starts a stream whose messages the test controls, on a connection of its own.
async fn open_stream(
    app: &TestApp,
) -> (
    mpsc::Sender<proto::StreamSentimentsRequest>,
    tokio::task::JoinHandle<Result<tonic::Response<proto::StreamSentimentsResponse>, Status>>,
) {
    let (tx, rx) = mpsc::channel(16);
    let address = app.address;
    let call = tokio::spawn(async move {
        // The client (and its connection) lives only inside this task.
        let mut client = IngestServiceClient::new(connect(address).await);
        client.stream_sentiments(ReceiverStream::new(rx)).await
    });
    (tx, call)
}

/// Sends a header and a bulk batch, and waits until the server has written rows inside
/// the stream's open transaction.
async fn stream_with_rows_in_flight(
    app: &TestApp,
    stream_id: &str,
) -> (
    mpsc::Sender<proto::StreamSentimentsRequest>,
    tokio::task::JoinHandle<Result<tonic::Response<proto::StreamSentimentsResponse>, Status>>,
) {
    let participation = app.participation().await;
    let (tx, call) = open_stream(app).await;
    tx.send(frames::header(stream_id, &participation.id))
        .await
        .unwrap();
    tx.send(frames::batch(sentiments(0, BULK_ITEMS)))
        .await
        .unwrap();
    eventually(
        "the server writes rows in the stream's transaction",
        || async { writers(&app.db).await > 0 },
    )
    .await;
    (tx, call)
}

async fn assert_nothing_stored(app: &TestApp, stream_id: &str) {
    // Once no transaction holds sentiments any more, the stream has ended one way or the
    // other; a commit would show its rows now.
    eventually("the stream's transaction ends", || async {
        writers(&app.db).await == 0
    })
    .await;
    assert_eq!(stored_for(&app.db, stream_id).await, 0);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM ingest_streams").await,
        0
    );
    let idle_in_transaction = count(
        &app.db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND state LIKE 'idle in transaction%'",
    )
    .await;
    assert_eq!(idle_in_transaction, 0);
}

#[tokio::test]
async fn a_stream_the_client_cancels_stores_nothing() {
    let app = spawn_writing_app().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = stream_with_rows_in_flight(&app, &stream_id).await;
    // Cancel the call while the request stream is still open (the sender is alive):
    // the client resets the HTTP/2 stream.
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_nothing_stored(&app, &stream_id).await;
    drop(tx);

    // The server's connection pool came through: the next stream commits.
    let participation = app.participation().await;
    let next = Uuid::new_v4().to_string();
    let receipt = send(
        &app,
        frames::stream(&next, &participation.id, vec![sentiments(0, 10)]),
    )
    .await
    .unwrap();
    assert_eq!(receipt.items_stored, 10);
}

#[tokio::test]
async fn a_stream_whose_connection_is_lost_stores_nothing() {
    let app = spawn_writing_app().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = stream_with_rows_in_flight(&app, &stream_id).await;
    // Dropping the client's only channel closes its TCP connection.
    call.abort();
    let _ = call.await;
    drop(tx);
    assert_nothing_stored(&app, &stream_id).await;
}

#[tokio::test]
async fn a_stream_that_ends_without_a_trailer_stores_nothing() {
    let app = spawn_writing_app().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = stream_with_rows_in_flight(&app, &stream_id).await;
    // A clean half-close, which is also what the server sees of some cancellations.
    drop(tx);
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(violated_fields(&status), ["trailer"]);
    assert_nothing_stored(&app, &stream_id).await;
}

#[tokio::test]
async fn a_failing_database_write_stores_nothing() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    // A real write failure in the second flush: the database refuses one row.
    refuse_sentiments_scored(&app.db, 0.875).await;
    let mut batch = sentiments(0, 3000);
    batch[2500].score = Some(0.875);
    let stream_id = Uuid::new_v4().to_string();
    let status = send(
        &app,
        frames::stream(&stream_id, &participation.id, vec![batch]),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        !status.message().contains("refused by test"),
        "no internals: {}",
        status.message()
    );
    assert_nothing_stored(&app, &stream_id).await;
}

#[tokio::test]
async fn badly_framed_streams_are_refused() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let id = Uuid::new_v4().to_string();
    let p = participation.id.as_str();
    let cases: Vec<(Vec<proto::StreamSentimentsRequest>, &str)> = vec![
        (vec![], "header"),
        (
            vec![frames::batch(sentiments(0, 1)), frames::trailer(1)],
            "header",
        ),
        (
            vec![frames::header("nope", p), frames::trailer(0)],
            "header.stream_id",
        ),
        (
            vec![frames::header(&id, ""), frames::trailer(0)],
            "header.participation_id",
        ),
        (
            vec![
                frames::header(&id, p),
                frames::batch(sentiments(0, 2)),
                frames::trailer(3),
            ],
            "trailer.item_count",
        ),
        (
            vec![
                frames::header(&id, p),
                frames::header(&id, p),
                frames::trailer(0),
            ],
            "header",
        ),
        (
            vec![
                frames::header(&id, p),
                frames::trailer(0),
                frames::batch(sentiments(0, 1)),
            ],
            "trailer",
        ),
        (
            vec![
                frames::header(&id, p),
                frames::batch(vec![]),
                frames::trailer(0),
            ],
            "batch.sentiments",
        ),
        (
            vec![
                frames::header(&id, p),
                proto::StreamSentimentsRequest { frame: None },
            ],
            "frame",
        ),
    ];
    for (messages, field) in cases {
        let status = send(&app, messages.clone()).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field], "{messages:?}");
    }
    let status = send(
        &app,
        frames::stream(&id, &Uuid::new_v4().to_string(), vec![sentiments(0, 1)]),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM ingest_streams").await,
        0
    );

    // An empty but complete stream commits, with zero items.
    let receipt = send(&app, vec![frames::header(&id, p), frames::trailer(0)])
        .await
        .unwrap();
    assert_eq!(receipt.items_stored, 0);
}

#[tokio::test]
async fn event_streams_commit_whole_or_not_at_all() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let events = |n: i64, kind: i32| proto::EventBatch {
        events: (0..n)
            .map(|i| proto::NewEvent {
                occurred_at: at(t0(), i),
                kind,
                attributes: [("seq".to_owned(), i.to_string())].into(),
            })
            .collect(),
    };
    let stream = |id: &str, batches: Vec<proto::EventBatch>| {
        let batches = batches.into_iter().map(|b| b.events).collect();
        crate::helpers::event_frames::stream(id, &participation.id, batches)
    };
    let talk = proto::EventKind::TalkStarted as i32;
    let receipt = app
        .client
        .clone()
        .stream_events(tokio_stream::iter(stream(
            &Uuid::new_v4().to_string(),
            vec![events(2500, talk), events(10, talk)],
        )))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(receipt.items_stored, 2510);
    assert_eq!(
        count(
            &app.db,
            "SELECT count(*) FROM events WHERE attributes ? 'seq'"
        )
        .await,
        2510
    );

    let status = app
        .client
        .clone()
        .stream_events(tokio_stream::iter(stream(
            &Uuid::new_v4().to_string(),
            vec![events(2500, talk), events(3, 99)],
        )))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["events[2500].kind"]);
    assert_eq!(count(&app.db, "SELECT count(*) FROM events").await, 2510);
}

#[tokio::test]
async fn a_replay_with_other_items_is_already_exists_and_stores_nothing() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let first = send(
        &app,
        frames::stream(&stream_id, &participation.id, vec![sentiments(0, 500)]),
    )
    .await
    .unwrap();
    // The case: 7 items where 500 were committed; and the same count, one item
    // changed.
    let mut changed = sentiments(0, 500);
    changed[499].score = Some(-0.25);
    for batches in [vec![sentiments(0, 7)], vec![changed]] {
        let status = send(&app, frames::stream(&stream_id, &participation.id, batches))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert!(
            status
                .message()
                .contains("committed already with other items"),
            "{status:?}"
        );
    }
    // The same items still get the first receipt.
    let again = send(
        &app,
        frames::stream(&stream_id, &participation.id, vec![sentiments(0, 500)]),
    )
    .await
    .unwrap();
    assert!(again.replayed);
    assert_eq!(again.committed_at, first.committed_at);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 500);
    // A replay is framed and checked like any stream: a wrong trailer is refused.
    let mut short = frames::stream(&stream_id, &participation.id, vec![sentiments(0, 500)]);
    short.pop();
    short.push(frames::trailer(499));
    let status = send(&app, short).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A receipt from before migration 0005 has no digest: its replays are answered as
    // they were, with the first receipt.
    sqlx::query("UPDATE ingest_streams SET items_digest = NULL")
        .execute(&app.db)
        .await
        .unwrap();
    let old = send(
        &app,
        frames::stream(&stream_id, &participation.id, vec![sentiments(0, 7)]),
    )
    .await
    .unwrap();
    assert!(old.replayed);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 500);
}
