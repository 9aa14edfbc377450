//! Retries never store anything twice: unary creates with a request_id, and streams with
//! their stream_id (see streams.rs), return what the first attempt stored.

use krisp_ingest::proto;
use tokio::task::JoinHandle;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::helpers::{
    TestApp, at, count, lock_participation, sentiment_inserts_waiting, sentiments, spawn_app, t0,
    violated_fields,
};

#[tokio::test]
async fn a_retried_create_user_returns_the_first_user() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let request_id = Uuid::new_v4().to_string();
    let request = proto::CreateUserRequest {
        external_id: "retry-me".into(),
        country: "AM".into(),
        request_id: request_id.clone(),
        ..Default::default()
    };
    let first = client
        .create_user(request.clone())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(first.id, request_id, "the request id names the user");
    for _ in 0..3 {
        let again = client
            .create_user(request.clone())
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(again, first);
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM users").await, 1);

    let different = proto::CreateUserRequest {
        external_id: "someone-else".into(),
        ..request.clone()
    };
    let status = client.create_user(different).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains("request_id"),
        "{}",
        status.message()
    );
    let bad = proto::CreateUserRequest {
        request_id: "nope".into(),
        ..request
    };
    assert_eq!(
        violated_fields(&client.create_user(bad).await.unwrap_err()),
        ["request_id"]
    );
    assert_eq!(count(&app.db, "SELECT count(*) FROM users").await, 1);
}

#[tokio::test]
async fn retried_sessions_and_joins_create_nothing_twice() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    app.upsert_timezone("UTC", 0).await;
    let user = app.create_user("joiner").await;
    let create = proto::CreateSessionRequest {
        session_type: proto::SessionType::Webinar as i32,
        started_at: at(t0(), 0),
        request_id: Uuid::new_v4().to_string(),
    };
    let session = client
        .create_session(create.clone())
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let again = client
        .create_session(create.clone())
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(again, session);
    let other = proto::CreateSessionRequest {
        started_at: at(t0(), 5),
        ..create
    };
    assert_eq!(
        client.create_session(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(count(&app.db, "SELECT count(*) FROM sessions").await, 1);

    let join = proto::JoinSessionRequest {
        user_id: user.id.clone(),
        session_id: session.id.clone(),
        timezone_code: "UTC".into(),
        connected_at: at(t0(), 1),
        request_id: Uuid::new_v4().to_string(),
    };
    let participation = client
        .join_session(join.clone())
        .await
        .unwrap()
        .into_inner()
        .participation
        .unwrap();
    let again = client
        .join_session(join.clone())
        .await
        .unwrap()
        .into_inner()
        .participation
        .unwrap();
    assert_eq!(again, participation);
    // Without the request id, joining again is the usual conflict.
    let fresh = proto::JoinSessionRequest {
        request_id: String::new(),
        ..join
    };
    assert_eq!(
        client.join_session(fresh).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM participations").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_records_store_one_row_even_when_sent_at_once() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let request = proto::RecordSentimentRequest {
        participation_id: participation.id.clone(),
        sentiment: sentiments(3, 1).pop(),
        request_id: Uuid::new_v4().to_string(),
    };
    // Ten copies of the same call at the same moment (say, an eager retry policy).
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let (mut client, request) = (app.client.clone(), request.clone());
            tokio::spawn(async move { client.record_sentiment(request).await })
        })
        .collect();
    for call in calls {
        let stored = call.await.unwrap().unwrap().into_inner().sentiment.unwrap();
        assert_eq!(stored.id, request.request_id);
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 1);
    let mut changed = request.clone();
    changed.sentiment.as_mut().unwrap().score = Some(-0.25);
    assert_eq!(
        app.client
            .clone()
            .record_sentiment(changed)
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );

    let event = proto::RecordEventRequest {
        participation_id: participation.id.clone(),
        event: Some(proto::NewEvent {
            occurred_at: at(t0(), 2),
            kind: proto::EventKind::SpeakerOff as i32,
            attributes: [("device".to_owned(), "headset".to_owned())].into(),
        }),
        request_id: Uuid::new_v4().to_string(),
    };
    let first = app
        .client
        .clone()
        .record_event(event.clone())
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    let again = app
        .client
        .clone()
        .record_event(event)
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(count(&app.db, "SELECT count(*) FROM events").await, 1);
}

/// A request_id reused for an item at another time is refused, though the stored key
/// (id, user, time) differs: the id is looked up in every partition. A call without a
/// request_id gets a new id and is never refused so.
#[tokio::test]
async fn a_request_id_reused_at_another_time_is_refused() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut client = app.client.clone();
    let request_id = Uuid::new_v4().to_string();
    let record = |offset: i64, request_id: &str| proto::RecordSentimentRequest {
        participation_id: participation.id.clone(),
        sentiment: sentiments(offset, 1).pop(),
        request_id: request_id.to_owned(),
    };
    client
        .record_sentiment(record(3, &request_id))
        .await
        .unwrap();
    // A day later: another partition, where daily partitions cover those days.
    let status = client
        .record_sentiment(record(3 + 86_400, &request_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    for _ in 0..2 {
        client.record_sentiment(record(3, "")).await.unwrap();
    }
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 3);

    let event = |offset: i64| proto::RecordEventRequest {
        participation_id: participation.id.clone(),
        event: Some(proto::NewEvent {
            occurred_at: at(t0(), offset),
            kind: proto::EventKind::TalkStarted as i32,
            attributes: Default::default(),
        }),
        request_id: request_id.clone(),
    };
    client.record_event(event(5)).await.unwrap();
    let status = client.record_event(event(6)).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(count(&app.db, "SELECT count(*) FROM events").await, 1);
}

/// One request_id sent for items at ten different times, twice each, all written in one
/// batch: one item is stored, its two calls get it, the other eighteen are
/// ALREADY_EXISTS. (In one statement they each passed the look-up of the id, which sees
/// none of the rows its own statement inserts: ten were stored.) Both sentiment writers
/// are first held on a locked participation, so that the twenty calls queue and make one
/// batch when it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_sent_at_once_for_different_items_stores_one() {
    let app = spawn_app().await;
    let (held, participation) = (app.participation().await, app.participation().await);
    let held = HeldWriters::hold(&app, &held.id).await;
    let request_id = Uuid::new_v4().to_string();
    let calls: Vec<_> = (0..20)
        .map(|i| record(&app, &participation.id, i % 10, &request_id))
        .collect();
    held.release().await;
    let (mut stored, mut refused) = (Vec::new(), 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(started_at) => stored.push(started_at),
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((stored.len(), refused), (2, 18), "{stored:?}");
    assert_eq!(stored[0], stored[1]);
    let sql = format!("SELECT count(*) FROM sentiments WHERE id = '{request_id}'");
    assert_eq!(count(&app.db, &sql).await, 1);
}

/// One request_id sent at once for two items at the same time that differ in label and
/// score, each twice, in one batch: one of the items is stored and its two calls get it;
/// the other two are ALREADY_EXISTS, never told that their item was stored. (Matched by
/// participation, id and time alone, all four calls were answered OK.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_sent_at_once_for_two_items_at_one_time_stores_one() {
    let app = spawn_app().await;
    let (held, participation) = (app.participation().await, app.participation().await);
    let held = HeldWriters::hold(&app, &held.id).await;
    let request_id = Uuid::new_v4().to_string();
    let neutral = sentiments(5, 1).pop().unwrap();
    let negative = proto::NewSentiment {
        label: proto::SentimentLabel::Negative as i32,
        score: Some(-0.5),
        ..neutral
    };
    let sent = [&neutral, &negative, &neutral, &negative];
    let calls: Vec<_> = sent
        .iter()
        .map(|&s| record_sentiment(&app, &participation.id, Some(*s), &request_id))
        .collect();
    held.release().await;
    let (mut stored, mut refused) = (Vec::new(), Vec::new());
    for (call, sent) in calls.into_iter().zip(sent) {
        match call.await.unwrap() {
            Ok(answer) => {
                assert_eq!((answer.label, answer.score), (sent.label, sent.score));
                stored.push(sent.label);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                refused.push(sent.label);
            }
        }
    }
    assert_eq!(
        (stored.len(), refused.len()),
        (2, 2),
        "{stored:?} {refused:?}"
    );
    assert_eq!(stored[0], stored[1]);
    assert!(refused.iter().all(|label| *label != stored[0]));
    let label = if stored[0] == neutral.label {
        "neutral"
    } else {
        "negative"
    };
    let sql =
        format!("SELECT count(*) FROM sentiments WHERE id = '{request_id}' AND label = '{label}'");
    assert_eq!(count(&app.db, &sql).await, 1);
    let sql = format!("SELECT count(*) FROM sentiments WHERE id = '{request_id}'");
    assert_eq!(count(&app.db, &sql).await, 1);
}

/// A request_id whose item is gone (the retention dropped its partition; here the row is
/// deleted) stays taken: sending it again is ALREADY_EXISTS and stores nothing.
#[tokio::test]
async fn a_request_id_stays_taken_after_its_item_is_gone() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut client = app.client.clone();
    let request = proto::RecordSentimentRequest {
        participation_id: participation.id.clone(),
        sentiment: sentiments(3, 1).pop(),
        request_id: Uuid::new_v4().to_string(),
    };
    client.record_sentiment(request.clone()).await.unwrap();
    sqlx::query("DELETE FROM sentiments WHERE id = $1::uuid")
        .bind(&request.request_id)
        .execute(&app.db)
        .await
        .unwrap();
    let status = client.record_sentiment(request).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("no longer stored"), "{status:?}");
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
}

/// Two users may choose the same request_id: in one batch, one user's new item is stored
/// and the other's reuse of it (for another item) is ALREADY_EXISTS. The calls are
/// matched to what the statement stored by participation, id and time, not by id alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_with_one_request_id_in_one_batch_each_get_their_own_outcome() {
    let app = spawn_app().await;
    let held = app.participation().await;
    let (first, second) = (app.participation().await, app.participation().await);
    let request_id = Uuid::new_v4().to_string();
    record(&app, &second.id, 1, &request_id)
        .await
        .unwrap()
        .unwrap();
    let held = HeldWriters::hold(&app, &held.id).await;
    let new = record(&app, &first.id, 5, &request_id);
    let reused = record(&app, &second.id, 5, &request_id);
    held.release().await;
    new.await.unwrap().unwrap();
    let status = reused.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let sql = format!("SELECT count(*) FROM sentiments WHERE id = '{request_id}'");
    assert_eq!(count(&app.db, &sql).await, 2);
}

/// A RecordSentiment of one sentiment `offset` seconds in, in a task of its own: the
/// stored sentiment's start, or the refusal.
fn record(
    app: &TestApp,
    participation_id: &str,
    offset: i64,
    request_id: &str,
) -> JoinHandle<Result<Option<prost_types::Timestamp>, Status>> {
    let call = record_sentiment(
        app,
        participation_id,
        sentiments(offset, 1).pop(),
        request_id,
    );
    tokio::spawn(async move { call.await.unwrap().map(|s| s.started_at) })
}

/// A RecordSentiment of `sentiment`, in a task of its own: the sentiment the server
/// answered with, or the refusal.
fn record_sentiment(
    app: &TestApp,
    participation_id: &str,
    sentiment: Option<proto::NewSentiment>,
    request_id: &str,
) -> JoinHandle<Result<proto::Sentiment, Status>> {
    let mut client = app.client.clone();
    let request = proto::RecordSentimentRequest {
        participation_id: participation_id.to_owned(),
        sentiment,
        request_id: request_id.to_owned(),
    };
    tokio::spawn(async move {
        let reply = client.record_sentiment(request).await;
        reply.map(|r| r.into_inner().sentiment.unwrap())
    })
}

/// Both sentiment writers held on a locked participation, each with a batch of one call
/// older than the batcher's STALLED (20 ms): the calls made next queue, and make one
/// batch once released.
struct HeldWriters {
    locker: sqlx::Transaction<'static, sqlx::Postgres>,
    calls: Vec<JoinHandle<Result<Option<prost_types::Timestamp>, Status>>>,
}

impl HeldWriters {
    async fn hold(app: &TestApp, participation_id: &str) -> Self {
        let locker = lock_participation(&app.db, participation_id).await;
        let mut calls = Vec::new();
        for writers in 1..=2 {
            calls.push(record(app, participation_id, writers, ""));
            sentiment_inserts_waiting(&app.db, writers).await;
            // Older than STALLED: the next batch goes to the other writer.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Self { locker, calls }
    }

    /// Lets the calls made meanwhile queue, then releases the writers.
    async fn release(self) {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        self.locker.rollback().await.unwrap();
        for call in self.calls {
            call.await.unwrap().unwrap();
        }
    }
}
