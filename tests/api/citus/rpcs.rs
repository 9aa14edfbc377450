//! Each RPC through the real server against the coordinator, with its errors, retries and
//! the rows it leaves (read on the coordinator).

use krisp_ingest::proto::{self, live_feed_response::Frame as Reply, timeline_entry::Entry};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use uuid::Uuid;

use crate::{
    citus::shared_app,
    helpers::{
        BULK_ITEMS, TestApp, at, event_frames, frames, leave, sentiments, spawn_app_on, t0,
        violated_fields,
    },
    live::{FeedCall, append, close, feed_rows},
    require_citus,
    users_timezones_sessions::sessions_end_after_their_connections,
};

/// Rows of `table` whose `column` is `id`, on the coordinator.
async fn rows(db: &PgPool, table: &str, column: &str, id: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE {column} = $1::uuid"
    ))
    .bind(id)
    .fetch_one(db)
    .await
    .unwrap()
}

fn sentiment(start: i64, end: i64) -> proto::NewSentiment {
    proto::NewSentiment {
        started_at: at(t0(), start),
        ended_at: at(t0(), end),
        label: proto::SentimentLabel::Positive as i32,
        score: Some(0.5),
    }
}

fn event(second: i64) -> proto::NewEvent {
    proto::NewEvent {
        occurred_at: at(t0(), second),
        kind: proto::EventKind::MicrophoneMuted as i32,
        attributes: [("device".to_owned(), "headset".to_owned())].into(),
    }
}

fn record_sentiment(
    participation_id: &str,
    item: proto::NewSentiment,
    request_id: &str,
) -> proto::RecordSentimentRequest {
    proto::RecordSentimentRequest {
        participation_id: participation_id.into(),
        sentiment: Some(item),
        request_id: request_id.into(),
    }
}

fn record_event(
    participation_id: &str,
    item: proto::NewEvent,
    request_id: &str,
) -> proto::RecordEventRequest {
    proto::RecordEventRequest {
        participation_id: participation_id.into(),
        event: Some(item),
        request_id: request_id.into(),
    }
}

#[tokio::test]
async fn users_timezones_sessions_and_participations_work_on_citus() {
    let cluster = require_citus!();
    let (_shared, db, app) = shared_app(cluster).await;
    let mut client = app.client.clone();

    // Users: a retry with the request id returns the first; a taken external id is refused.
    let request_id = Uuid::new_v4().to_string();
    let external_id = format!("citus-{request_id}");
    let create = proto::CreateUserRequest {
        request_id: request_id.clone(),
        external_id: external_id.clone(),
        country: "AM".into(),
        native_language: "hy".into(),
        region: "Yerevan".into(),
    };
    let user = client
        .create_user(create.clone())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.id, request_id);
    let again = client
        .create_user(create.clone())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(again, user);
    let taken = proto::CreateUserRequest {
        request_id: String::new(),
        ..create.clone()
    };
    let status = client.create_user(taken).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let conflicting = proto::CreateUserRequest {
        external_id: format!("{external_id}-other"),
        ..create
    };
    let status = client.create_user(conflicting).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(rows(&db, "users", "id", &user.id).await, 1);
    assert_eq!(rows(&db, "user_external_ids", "user_id", &user.id).await, 1);
    assert_eq!(
        crate::helpers::fetch_user(&mut client, &user.id).await,
        user
    );
    let status = app.get_unknown_user().await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // Timezones: created, then updated, and listed.
    let code = format!("Test/{}", Uuid::new_v4().simple());
    app.upsert_timezone(&code, 3600).await;
    let updated = app.upsert_timezone(&code, 7200).await;
    assert_eq!(updated.utc_offset.unwrap().seconds, 7200);
    let listed = client
        .list_timezones(proto::ListTimezonesRequest {})
        .await
        .unwrap()
        .into_inner()
        .timezones;
    assert!(listed.iter().any(|tz| tz == &updated), "{listed:?}");
    app.upsert_timezone("UTC", 0).await;

    // Sessions: a retried create returns the first; ending twice is refused.
    let create = proto::CreateSessionRequest {
        request_id: Uuid::new_v4().to_string(),
        session_type: proto::SessionType::Meeting as i32,
        started_at: at(t0(), 0),
    };
    let session = client
        .create_session(create.clone())
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let again = client
        .create_session(create)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(again, session);
    assert_eq!(rows(&db, "sessions", "id", &session.id).await, 1);
    let fetched = client
        .get_session(proto::GetSessionRequest {
            session_id: session.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(fetched, session);

    // Participations: joined once; a second join and an overlap are refused.
    let participation = app.join(&user, &session, t0()).await.unwrap();
    let status = app.join(&user, &session, t0()).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let other_session = app.create_session(t0()).await;
    let status = app
        .join(&user, &other_session, t0() + chrono::TimeDelta::seconds(60))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = app
        .join(
            &app.create_user(&format!("late-{}", Uuid::new_v4())).await,
            &session,
            t0() - chrono::TimeDelta::seconds(60),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let fetched = crate::helpers::fetch_participation(&mut client, &participation.id).await;
    assert_eq!(fetched, participation);
    let status = client
        .get_participation(proto::GetParticipationRequest {
            participation_id: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let unknown_user = proto::User {
        id: Uuid::new_v4().to_string(),
        ..user.clone()
    };
    let status = app
        .join(&unknown_user, &other_session, t0())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(rows(&db, "participations", "user_id", &user.id).await, 1);

    // Leave, then end the session; ending it again is refused.
    client
        .leave_session(leave(&participation.id, 600, 300))
        .await
        .unwrap();
    let status = client
        .leave_session(leave(&participation.id, 600, 300))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let end = proto::EndSessionRequest {
        session_id: session.id.clone(),
        ended_at: at(t0(), 900),
    };
    let ended = client
        .end_session(end.clone())
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(ended.duration.unwrap().seconds, 900);
    let status = client.end_session(end).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let ended_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT ended_at FROM sessions WHERE id = $1::uuid")
            .bind(&session.id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(ended_at.is_some());
}

#[tokio::test]
async fn unary_records_store_once_and_retries_return_the_first_on_citus() {
    let cluster = require_citus!();
    let (_shared, db, app) = shared_app(cluster).await;
    let mut client = app.client.clone();
    let participation = app.participation().await;
    let id = participation.id.as_str();

    // Without a request id: the server makes the id.
    let stored = client
        .record_sentiment(record_sentiment(id, sentiment(1, 2), ""))
        .await
        .unwrap()
        .into_inner()
        .sentiment
        .unwrap();
    assert_eq!(rows(&db, "sentiments", "id", &stored.id).await, 1);
    let stored = client
        .record_event(record_event(id, event(3), ""))
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(rows(&db, "events", "id", &stored.id).await, 1);

    // With one: retries return the first, the same id with another item is refused.
    let request_id = Uuid::new_v4().to_string();
    let first = client
        .record_sentiment(record_sentiment(id, sentiment(4, 5), &request_id))
        .await
        .unwrap()
        .into_inner()
        .sentiment
        .unwrap();
    assert_eq!(first.id, request_id);
    for _ in 0..2 {
        let again = client
            .record_sentiment(record_sentiment(id, sentiment(4, 5), &request_id))
            .await
            .unwrap()
            .into_inner()
            .sentiment
            .unwrap();
        assert_eq!(again, first);
    }
    let status = client
        .record_sentiment(record_sentiment(id, sentiment(6, 7), &request_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(rows(&db, "sentiments", "id", &request_id).await, 1);
    let request_id = Uuid::new_v4().to_string();
    let first = client
        .record_event(record_event(id, event(8), &request_id))
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    let again = client
        .record_event(record_event(id, event(8), &request_id))
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(again, first);
    let status = client
        .record_event(record_event(id, event(9), &request_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(rows(&db, "events", "id", &request_id).await, 1);

    // Refusals: before the participation, an unknown participation, a bad item.
    let status = client
        .record_sentiment(record_sentiment(id, sentiment(-10, -5), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .record_event(record_event(&Uuid::new_v4().to_string(), event(1), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .record_sentiment(record_sentiment(id, sentiment(5, 4), ""))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["sentiment.ended_at"]);

    // Many calls at once, for the participations of several users (batched together,
    // across shards): each stored exactly once, retried or not.
    let mut participations = vec![participation.clone()];
    for _ in 0..5 {
        participations.push(app.participation().await);
    }
    let calls = (0..120).map(|i| {
        let mut client = client.clone();
        let participation_id = participations[i % participations.len()].id.clone();
        let request_id = if i % 2 == 0 {
            Uuid::new_v4().to_string()
        } else {
            String::new()
        };
        async move {
            let request = record_sentiment(
                &participation_id,
                sentiment(100 + i as i64, 101 + i as i64),
                &request_id,
            );
            let first = client
                .record_sentiment(request.clone())
                .await
                .unwrap()
                .into_inner();
            if !request_id.is_empty() {
                let again = client.record_sentiment(request).await.unwrap().into_inner();
                assert_eq!(again, first);
            }
            first.sentiment.unwrap().id
        }
    });
    let ids: Vec<String> = futures_util::future::join_all(calls).await;
    for id in &ids {
        assert_eq!(rows(&db, "sentiments", "id", id).await, 1, "{id}");
    }

    // The timeline: every item of the participation, in time order.
    let timeline = timeline(&app, id).await;
    let times: Vec<i64> = timeline.iter().map(entry_second).collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted);
    let stored: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM sentiments WHERE participation_id = $1::uuid) \
              + (SELECT count(*) FROM events WHERE participation_id = $1::uuid)",
    )
    .bind(id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(timeline.len() as i64, stored);
}

/// GetTimeline of `participation_id`, read to its end.
async fn timeline(app: &TestApp, participation_id: &str) -> Vec<proto::TimelineEntry> {
    let mut stream = app
        .client
        .clone()
        .get_timeline(proto::GetTimelineRequest {
            participation_id: participation_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        entries.push(message.entry.unwrap());
    }
    entries
}

/// Seconds after t0 at which a timeline entry starts.
fn entry_second(entry: &proto::TimelineEntry) -> i64 {
    let at = match entry.entry.as_ref().unwrap() {
        Entry::Sentiment(s) => s.started_at.unwrap(),
        Entry::Event(e) => e.occurred_at.unwrap(),
    };
    at.seconds - t0().timestamp()
}

#[tokio::test]
async fn client_streams_commit_all_or_nothing_on_citus() {
    let cluster = require_citus!();
    let (_shared, db, app) = shared_app(cluster).await;
    let mut client = app.client.clone();
    let participation = app.participation().await;
    let id = participation.id.as_str();

    // A spooled stream and a bulk upload (written as it arrives), then their replays.
    for (n, batches) in [
        (1_500, vec![sentiments(0, 500), sentiments(500, 1_000)]),
        (BULK_ITEMS, vec![sentiments(2_000, BULK_ITEMS)]),
    ] {
        let stream_id = Uuid::new_v4().to_string();
        let messages = frames::stream(&stream_id, id, batches);
        let receipt = client
            .stream_sentiments(tokio_stream::iter(messages.clone()))
            .await
            .unwrap()
            .into_inner()
            .receipt
            .unwrap();
        assert_eq!((receipt.items_stored, receipt.replayed), (n as u64, false));
        assert_eq!(
            rows(&db, "sentiments", "stream_id", &stream_id).await,
            n as i64
        );
        let replay = client
            .stream_sentiments(tokio_stream::iter(messages))
            .await
            .unwrap()
            .into_inner()
            .receipt
            .unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.committed_at, receipt.committed_at);
        assert_eq!(
            rows(&db, "sentiments", "stream_id", &stream_id).await,
            n as i64
        );
        // The same stream id with other items.
        let other = frames::stream(&stream_id, id, vec![sentiments(9_000, 3)]);
        let status = client
            .stream_sentiments(tokio_stream::iter(other))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    }

    // Events.
    let stream_id = Uuid::new_v4().to_string();
    let events = (0..50).map(|i| event(10_000 + i)).collect();
    let messages = event_frames::stream(&stream_id, id, vec![events]);
    let receipt = client
        .stream_events(tokio_stream::iter(messages.clone()))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(receipt.items_stored, 50);
    let replay = client
        .stream_events(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(rows(&db, "events", "stream_id", &stream_id).await, 50);

    // An invalid item anywhere: INVALID_ARGUMENT naming it, nothing stored.
    let stream_id = Uuid::new_v4().to_string();
    let mut bad = sentiments(20_000, 10);
    bad[7].ended_at = bad[7].started_at;
    let messages = frames::stream(&stream_id, id, vec![sentiments(19_000, BULK_ITEMS), bad]);
    let status = client
        .stream_sentiments(tokio_stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        [format!("sentiments[{}].ended_at", BULK_ITEMS + 7)]
    );
    assert_eq!(rows(&db, "sentiments", "stream_id", &stream_id).await, 0);

    // Cancelled while its rows are being written: nothing stored.
    let stream_id = Uuid::new_v4().to_string();
    let (tx, rx) = mpsc::channel(4);
    tx.send(frames::header(&stream_id, id)).await.unwrap();
    tx.send(frames::batch(sentiments(30_000, BULK_ITEMS)))
        .await
        .unwrap();
    let mut streaming = client.clone();
    let call =
        tokio::spawn(async move { streaming.stream_sentiments(ReceiverStream::new(rx)).await });
    crate::helpers::eventually("the stream's rows are being written", || async {
        crate::helpers::count(
            &db,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY sentiments%'",
        )
        .await
            > 0
    })
    .await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    drop(tx);
    crate::helpers::eventually("the cancelled stream has rolled back", || async {
        crate::helpers::count(
            &db,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY sentiments%' \
             AND state <> 'idle'",
        )
        .await
            == 0
    })
    .await;
    assert_eq!(rows(&db, "sentiments", "stream_id", &stream_id).await, 0);
    assert_eq!(
        rows(&db, "ingest_streams", "stream_id", &stream_id).await,
        0
    );
}

#[tokio::test]
async fn live_feeds_resume_and_are_fenced_on_citus() {
    let cluster = require_citus!();
    let (_shared, db, a) = shared_app(cluster).await;
    let b = spawn_app_on(db.clone()).await;
    let participation = a.participation().await;
    let feed_id = Uuid::new_v4().to_string();

    let (mut call, committed) =
        FeedCall::open(a.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(committed, 0);
    assert_eq!(call.ack(append(1, 5)).await, 5);
    assert_eq!(feed_rows(&db, &feed_id).await, (5, 5, 5));
    // A cut: the client drops the call and resumes from the committed position.
    drop(call);
    let (mut call, committed) =
        FeedCall::open(a.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(committed, 5);
    assert_eq!(call.ack(append(3, 5)).await, 7);
    // A second stream (another replica) takes the feed over; the first is fenced off.
    let (mut newer, committed) =
        FeedCall::open(b.channel.clone(), &feed_id, &participation.id).await;
    assert_eq!(committed, 7);
    let status = call.send(append(8, 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(newer.ack(append(8, 3)).await, 10);
    let Ok(Reply::Closed(closed)) = newer.send(close(10)).await else {
        panic!("expected Closed");
    };
    assert_eq!(closed.items_stored, 10);
    assert_eq!(feed_rows(&db, &feed_id).await, (10, 10, 10));

    // Feeds of many users at once, written by the feed writers together.
    let feeds = (0..8).map(|_| {
        let a = &a;
        async move {
            let participation = a.participation().await;
            let feed_id = Uuid::new_v4().to_string();
            let (mut call, _) =
                FeedCall::open(a.channel.clone(), &feed_id, &participation.id).await;
            for first in (1..=40).step_by(10) {
                assert_eq!(call.ack(append(first, 10)).await, first + 9);
            }
            assert!(matches!(call.send(close(40)).await, Ok(Reply::Closed(_))));
            feed_id
        }
    });
    for feed_id in futures_util::future::join_all(feeds).await {
        assert_eq!(feed_rows(&db, &feed_id).await, (40, 40, 40));
    }
}

#[tokio::test]
async fn leave_and_delete_user_keep_their_rules_on_citus() {
    let cluster = require_citus!();
    let (_shared, db, app) = shared_app(cluster).await;
    let mut client = app.client.clone();
    let participation = app.participation().await;
    let id = participation.id.as_str();
    app.stream_sentiments(id, vec![sentiments(0, 100)]).await;
    client
        .record_event(record_event(id, event(150), &Uuid::new_v4().to_string()))
        .await
        .unwrap();

    // A leave before the end of a stored item is refused, saying until when.
    let status = client.leave_session(leave(id, 120, 60)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["disconnected_at"]);
    let left = client
        .leave_session(leave(id, 200, 60))
        .await
        .unwrap()
        .into_inner()
        .participation
        .unwrap();
    assert_eq!(left.disconnected_at, at(t0(), 200));
    // After the leave: items past it are refused, in every way of sending them.
    let status = client
        .record_sentiment(record_sentiment(id, sentiment(300, 301), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let stream_id = Uuid::new_v4().to_string();
    let status = client
        .stream_sentiments(tokio_stream::iter(frames::stream(
            &stream_id,
            id,
            vec![sentiments(250, 10)],
        )))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // DeleteUser removes the user and everything of theirs, on every node.
    let user_id = participation.user_id.clone();
    client
        .delete_user(proto::DeleteUserRequest {
            user_id: user_id.clone(),
        })
        .await
        .unwrap();
    for table in [
        "users",
        "user_external_ids",
        "participations",
        "sentiments",
        "events",
        "ingest_streams",
        "event_request_ids",
    ] {
        let column = if table == "users" { "id" } else { "user_id" };
        assert_eq!(rows(&db, table, column, &user_id).await, 0, "{table}");
    }
    let status = client
        .delete_user(proto::DeleteUserRequest { user_id })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn a_session_never_ends_before_a_participant_connected_on_citus() {
    let cluster = require_citus!();
    let (_shared, _db, app) = shared_app(cluster).await;
    app.upsert_timezone("UTC", 0).await;
    sessions_end_after_their_connections(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_ranges_resumed_reads_and_chunks_on_citus() {
    let cluster = require_citus!();
    let (_shared, _db, app) = shared_app(cluster).await;
    crate::timeline::ranges_are_half_open_and_ordered(&app).await;
    crate::timeline::a_cut_read_resumes_after_its_last_entry(&app).await;
    crate::timeline::chunks_carry_the_same_entries_in_fewer_messages(&app).await;
    crate::timeline::reads_see_whole_appends_of_a_live_feed(&app).await;
}

#[tokio::test]
async fn live_feed_resends_are_checked_on_citus() {
    let cluster = require_citus!();
    let (_shared, _db, app) = shared_app(cluster).await;
    crate::live::resends_must_carry_the_items_sent_first(&app).await;
}
