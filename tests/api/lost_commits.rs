//! The answer to a commit lost on the way back (`tests/api/commit_cutter.rs` lets the
//! commit happen and drops its acknowledgement): every call is answered with the truth,
//! found out on a new connection, never with "nothing was stored" for something stored.
//! Where the database stays out of reach past the call's deadline, the answer says the
//! outcome is unknown, and the rows show why it had to.

use std::time::Duration;

use krisp_ingest::{
    app::{Application, Settings},
    error::OUTCOME_UNKNOWN,
    proto,
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::{
    commit_cutter::CommitCutter,
    helpers::{TestApp, at, count, current_database, fresh_database, leave, sentiments, t0},
    live::{FeedCall, append},
};

/// A server whose every connection to the database goes through a [`CommitCutter`]; the
/// test's own pool (`TestApp::db`) does not.
async fn app_behind_cutter() -> (TestApp, CommitCutter) {
    let db = fresh_database().await;
    let cutter = CommitCutter::to(&current_database(&db).await).await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(cutter.options().await)
        .await
        .unwrap();
    let application = Application::build(Settings::default(), pool).await.unwrap();
    let address = application.local_addr();
    tokio::spawn(application.run_until_stopped(std::future::pending()));
    (TestApp::connect(address, db).await, cutter)
}

/// Runs `call` with the next commit's answer dropped, and fails unless the cut came.
async fn lose_the_commit_of<T>(cutter: &CommitCutter, call: impl Future<Output = T>) -> T {
    cutter.arm(false);
    let answer = call.await;
    assert!(
        !cutter.armed(),
        "the call committed nothing the cutter could cut"
    );
    answer
}

async fn rows(db: &PgPool, sql: &str, id: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(Uuid::parse_str(id).unwrap())
        .fetch_one(db)
        .await
        .unwrap()
}

async fn users_with_id(db: &PgPool, id: &str) -> i64 {
    rows(db, "SELECT count(*) FROM users WHERE id = $1", id).await
}

fn record(participation_id: &str, request_id: &str, offset: i64) -> proto::RecordSentimentRequest {
    proto::RecordSentimentRequest {
        participation_id: participation_id.into(),
        sentiment: sentiments(offset, 1).pop(),
        request_id: request_id.into(),
    }
}

#[tokio::test]
async fn every_lost_commit_is_found_out_and_answered_with_what_was_stored() {
    let (app, cutter) = app_behind_cutter().await;
    let mut client = app.client.clone();
    app.upsert_timezone("UTC", 0).await;
    let participation = app.participation().await;
    let pid = participation.id.clone();

    // RecordSentiment with a request_id, and without: OK, stored once.
    let request_id = Uuid::new_v4().to_string();
    let stored = lose_the_commit_of(
        &cutter,
        client.record_sentiment(record(&pid, &request_id, 10)),
    )
    .await
    .expect("a keyed record whose commit was lost")
    .into_inner()
    .sentiment
    .unwrap();
    assert_eq!(stored.id, request_id);
    let stored = lose_the_commit_of(&cutter, client.record_sentiment(record(&pid, "", 20)))
        .await
        .expect("a record without request_id whose commit was lost")
        .into_inner()
        .sentiment
        .unwrap();
    assert_eq!(
        rows(
            &app.db,
            "SELECT count(*) FROM sentiments WHERE id = $1",
            &stored.id
        )
        .await,
        1
    );
    assert_eq!(
        rows(
            &app.db,
            "SELECT count(*) FROM sentiments WHERE participation_id = $1",
            &pid
        )
        .await,
        2
    );

    // A client stream: its receipt, its items once.
    let stream_id = Uuid::new_v4().to_string();
    let stream = crate::helpers::frames::stream(&stream_id, &pid, vec![sentiments(100, 50)]);
    let receipt = lose_the_commit_of(
        &cutter,
        client.stream_sentiments(tokio_stream::iter(stream)),
    )
    .await
    .expect("a stream whose commit was lost")
    .into_inner()
    .receipt
    .unwrap();
    assert_eq!(receipt.items_stored, 50);
    assert_eq!(
        rows(
            &app.db,
            "SELECT count(*) FROM sentiments WHERE stream_id = $1",
            &stream_id
        )
        .await,
        50
    );

    // CreateUser without a request_id (the server's own id), CreateSession, JoinSession.
    let external_id = format!("lost-{}", Uuid::new_v4());
    let user = lose_the_commit_of(
        &cutter,
        client.create_user(proto::CreateUserRequest {
            external_id: external_id.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("a CreateUser whose commit was lost")
    .into_inner()
    .user
    .unwrap();
    assert_eq!(users_with_id(&app.db, &user.id).await, 1);
    let session_id = Uuid::new_v4().to_string();
    let session = lose_the_commit_of(
        &cutter,
        client.create_session(proto::CreateSessionRequest {
            request_id: session_id.clone(),
            session_type: proto::SessionType::Call as i32,
            started_at: at(t0(), 0),
        }),
    )
    .await
    .expect("a CreateSession whose commit was lost")
    .into_inner()
    .session
    .unwrap();
    assert_eq!(session.id, session_id);
    let joined = lose_the_commit_of(&cutter, app.join(&user, &session, t0()))
        .await
        .expect("a JoinSession whose commit was lost");
    assert_eq!(
        rows(
            &app.db,
            "SELECT count(*) FROM participations WHERE user_id = $1",
            &user.id
        )
        .await,
        1
    );

    // LeaveSession, EndSession, DeleteUser: the change made, answered as made.
    let left = lose_the_commit_of(&cutter, client.leave_session(leave(&joined.id, 600, 60)))
        .await
        .expect("a LeaveSession whose commit was lost")
        .into_inner()
        .participation
        .unwrap();
    assert!(left.disconnected_at.is_some());
    let ended = lose_the_commit_of(
        &cutter,
        client.end_session(proto::EndSessionRequest {
            session_id: session_id.clone(),
            ended_at: at(t0(), 900),
        }),
    )
    .await
    .expect("an EndSession whose commit was lost")
    .into_inner()
    .session
    .unwrap();
    assert_eq!(ended.ended_at, at(t0(), 900));
    let deleted = lose_the_commit_of(
        &cutter,
        client.delete_user(proto::DeleteUserRequest {
            user_id: user.id.clone(),
        }),
    )
    .await
    .expect("a DeleteUser whose commit was lost")
    .into_inner();
    assert_eq!(deleted.participations_deleted, 1);
    assert_eq!(users_with_id(&app.db, &user.id).await, 0);

    // A live feed's append: acknowledged, found stored by its transaction's id.
    let feed_id = Uuid::new_v4().to_string();
    let (mut call, _) = FeedCall::open(app.channel.clone(), &feed_id, &pid).await;
    lose_the_commit_of(&cutter, call.send(append(1, 5)))
        .await
        .expect("an append whose commit was lost");
    let (_, resumed_at) = FeedCall::open(app.channel.clone(), &feed_id, &pid).await;
    assert_eq!(resumed_at, 5, "the append is stored, and Open says so");
    assert_eq!(
        rows(
            &app.db,
            "SELECT count(*) FROM sentiments WHERE participation_id = $1",
            &pid
        )
        .await,
        2 + 50 + 4
    );
    assert_eq!(
        rows(
            &app.db,
            "SELECT count(*) FROM events WHERE participation_id = $1",
            &pid
        )
        .await,
        1
    );

    eprintln!("commits whose answer was lost: {}", cutter.cuts());
    assert_eq!(cutter.cuts(), 10);
}

#[tokio::test]
async fn an_outcome_the_database_cannot_tell_in_time_is_answered_as_unknown() {
    let (app, cutter) = app_behind_cutter().await;
    app.upsert_timezone("UTC", 0).await;
    let participation = app.participation().await;
    let request_id = Uuid::new_v4().to_string();
    let mut call = Request::new(record(&participation.id, &request_id, 10));
    call.set_timeout(Duration::from_secs(2));

    // The commit's answer is lost, and the database stays out of reach past the deadline.
    cutter.arm(true);
    let status = app.client.clone().record_sentiment(call).await.unwrap_err();
    assert_eq!(cutter.cuts(), 1);
    assert_unknown(&status);
    // Unknown to the server, and stored indeed: "nothing was stored" would have been false.
    assert_eq!(
        count(
            &app.db,
            &format!("SELECT count(*) FROM sentiments WHERE id = '{request_id}'")
        )
        .await,
        1
    );

    // The retry the answer promised to be safe: the stored sentiment, once.
    cutter.restore();
    cutter.close_all();
    let retried = app
        .client
        .clone()
        .record_sentiment(record(&participation.id, &request_id, 10))
        .await
        .expect("the retry")
        .into_inner()
        .sentiment
        .unwrap();
    assert_eq!(retried.id, request_id);
    assert_eq!(
        count(
            &app.db,
            &format!("SELECT count(*) FROM sentiments WHERE id = '{request_id}'")
        )
        .await,
        1
    );
}

/// Fails unless `status` says the outcome is unknown, as a client can tell by machine.
fn assert_unknown(status: &Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not known"), "{status:?}");
    let info = status.get_error_details().error_info().cloned();
    assert_eq!(
        info.map(|i| i.reason).as_deref(),
        Some(OUTCOME_UNKNOWN),
        "{status:?}"
    );
}
