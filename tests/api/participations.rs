use krisp_ingest::proto;
use tonic::Code;

use crate::helpers::{at, count, eventually, leave, sentiments, spawn_app, t0, violated_fields};

#[tokio::test]
async fn join_and_leave_record_the_participation() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let participation = app.participation().await;
    assert_eq!(participation.timezone_code, "UTC");
    assert!(participation.disconnected_at.is_none() && participation.talked_time.is_none());

    let left = client
        .leave_session(leave(&participation.id, 600, 120))
        .await
        .unwrap()
        .into_inner()
        .participation
        .unwrap();
    assert_eq!(left.disconnected_at, at(t0(), 600));
    assert_eq!(left.talked_time.unwrap().seconds, 120);
    assert_eq!(
        (left.microphone_used, left.speaker_used),
        (Some(true), Some(false))
    );
    let fetched = crate::helpers::fetch_participation(&mut client, &participation.id.clone()).await;
    assert_eq!(fetched, left);
    let stored: (i64, bool, bool) =
        sqlx::query_as("SELECT talked_time_us, microphone_used, speaker_used FROM participations")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored, (120_000_000, true, false));

    // Leaving twice is refused, and changes nothing.
    let status = client
        .leave_session(leave(&participation.id, 900, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        count(
            &app.db,
            "SELECT count(*) FROM participations WHERE disconnected_at = to_timestamp(1750000600)"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn leave_checks_times_and_usage() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let participation = app.participation().await;
    let status = client
        .leave_session(leave(&participation.id, -10, 0))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["disconnected_at"]);
    let status = client
        .leave_session(leave(&participation.id, 60, 61))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["talked_time"]);
    let status = client
        .leave_session(leave(&participation.id, 60, -1))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["talked_time"]);
    let status = client
        .leave_session(leave(&uuid::Uuid::new_v4().to_string(), 60, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        count(
            &app.db,
            "SELECT count(*) FROM participations WHERE disconnected_at IS NULL"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_user_joins_a_session_once() {
    let app = spawn_app().await;
    app.upsert_timezone("UTC", 0).await;
    let user = app.create_user("u").await;
    let session = app.create_session(t0()).await;
    let first = app.join(&user, &session, t0()).await.unwrap();
    app.client
        .clone()
        .leave_session(leave(&first.id, 10, 1))
        .await
        .unwrap();
    // Even after leaving, and at a time that overlaps nothing.
    let status = app
        .join(&user, &session, t0() + chrono::TimeDelta::seconds(20))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM participations").await,
        1
    );
}

#[tokio::test]
async fn a_users_participations_never_overlap() {
    let app = spawn_app().await;
    app.upsert_timezone("UTC", 0).await;
    let user = app.create_user("u").await;
    let other_user = app.create_user("v").await;
    let first_session = app.create_session(t0()).await;
    let second_session = app.create_session(t0()).await;
    let first = app.join(&user, &first_session, t0()).await.unwrap();

    // The first participation is open, so it runs on: any later join overlaps it.
    let status = app
        .join(&user, &second_session, t0() + chrono::TimeDelta::hours(5))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("overlap"), "{}", status.message());
    // Another user may be in both sessions at once.
    app.join(&other_user, &second_session, t0()).await.unwrap();

    app.client
        .clone()
        .leave_session(leave(&first.id, 100, 10))
        .await
        .unwrap();
    let status = app
        .join(
            &user,
            &second_session,
            t0() + chrono::TimeDelta::seconds(99),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // Right when the first one ended is fine: ranges are half-open.
    app.join(
        &user,
        &second_session,
        t0() + chrono::TimeDelta::seconds(100),
    )
    .await
    .unwrap();
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM participations").await,
        3
    );
}

#[tokio::test]
async fn join_refuses_unknown_references_and_times_outside_the_session() {
    let app = spawn_app().await;
    app.upsert_timezone("UTC", 0).await;
    let user = app.create_user("u").await;
    let session = app.create_session(t0()).await;
    let mut client = app.client.clone();
    let request =
        |user_id: &str, session_id: &str, tz: &str, offset: i64| proto::JoinSessionRequest {
            request_id: String::new(),
            user_id: user_id.into(),
            session_id: session_id.into(),
            timezone_code: tz.into(),
            connected_at: at(t0(), offset),
        };
    let unknown = uuid::Uuid::new_v4().to_string();
    for (req, what) in [
        (request(&unknown, &session.id, "UTC", 0), "user"),
        (request(&user.id, &unknown, "UTC", 0), "session"),
        (
            request(&user.id, &session.id, "Nowhere/Land", 0),
            "timezone",
        ),
    ] {
        let status = client.join_session(req).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{what}: {status:?}");
        assert!(
            status.message().contains(what),
            "{what}: {}",
            status.message()
        );
    }
    let status = client
        .join_session(request(&user.id, &session.id, "UTC", -1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("before the session started"));
    let ended = app.create_session(t0()).await;
    client
        .end_session(proto::EndSessionRequest {
            session_id: ended.id.clone(),
            ended_at: at(t0(), 10),
        })
        .await
        .unwrap();
    let status = client
        .join_session(request(&user.id, &ended.id, "UTC", 11))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("after the session ended"));
    let status = client
        .join_session(proto::JoinSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["user_id", "session_id", "timezone_code", "connected_at"]
    );
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM participations").await,
        0
    );
}

#[tokio::test]
async fn deleting_a_user_removes_everything_under_them() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut client = app.client.clone();
    client
        .record_sentiment(proto::RecordSentimentRequest {
            request_id: String::new(),
            participation_id: participation.id.clone(),
            sentiment: crate::helpers::sentiments(0, 1).pop(),
        })
        .await
        .unwrap();
    client
        .record_event(proto::RecordEventRequest {
            request_id: String::new(),
            participation_id: participation.id.clone(),
            event: Some(proto::NewEvent {
                occurred_at: at(t0(), 1),
                kind: proto::EventKind::TalkStarted as i32,
                attributes: Default::default(),
            }),
        })
        .await
        .unwrap();
    let deleted = client
        .delete_user(proto::DeleteUserRequest {
            user_id: participation.user_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.participations_deleted, 1);
    for table in ["users", "participations", "sentiments", "events"] {
        assert_eq!(
            count(&app.db, &format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    // Sessions and timezones are shared, and stay.
    assert_eq!(count(&app.db, "SELECT count(*) FROM sessions").await, 1);
}

#[tokio::test]
async fn the_schema_enforces_the_rules_without_the_service() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let pid: uuid::Uuid = participation.id.parse().unwrap();
    let uid: uuid::Uuid = participation.user_id.parse().unwrap();
    let insert_sentiment = |started: i64, ended: i64, score: f64| {
        sqlx::query(
            "INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label, score) \
             VALUES (gen_random_uuid(), $1, $2, to_timestamp($3), to_timestamp($4), 'neutral', $5)",
        )
        .bind(uid)
        .bind(pid)
        .bind(started as f64)
        .bind(ended as f64)
        .bind(score)
        .execute(&app.db)
    };
    let constraint = |r: Result<sqlx::postgres::PgQueryResult, sqlx::Error>| {
        r.unwrap_err()
            .as_database_error()
            .and_then(|e| e.constraint().map(str::to_owned))
    };
    assert_eq!(
        constraint(insert_sentiment(10, 5, 0.0).await).as_deref(),
        Some("sentiments_ends_after_start")
    );
    assert_eq!(
        constraint(insert_sentiment(1, 5, f64::NAN).await).as_deref(),
        Some("sentiments_score_range")
    );
    let orphan = sqlx::query(
        "INSERT INTO events (id, user_id, participation_id, occurred_at, kind) \
         VALUES (gen_random_uuid(), $1, gen_random_uuid(), now(), 'connected')",
    )
    .bind(uid)
    .execute(&app.db)
    .await;
    assert_eq!(
        constraint(orphan).as_deref(),
        Some("events_participation_fkey")
    );
    let overlap = sqlx::query(
        "WITH s AS (INSERT INTO sessions (id, session_type, started_at) \
                    VALUES (gen_random_uuid(), 'call', to_timestamp(0)) RETURNING id) \
         INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
         SELECT gen_random_uuid(), user_id, (SELECT id FROM s), 'UTC', connected_at + interval '1 hour' \
         FROM participations",
    )
    .execute(&app.db)
    .await;
    assert_eq!(
        constraint(overlap).as_deref(),
        Some("participations_no_overlap")
    );
    let duplicate_tz = sqlx::query("INSERT INTO timezones VALUES ('UTC', 0)")
        .execute(&app.db)
        .await;
    assert_eq!(constraint(duplicate_tz).as_deref(), Some("timezones_pkey"));
}

/// A participation spans its items: a leave before the end of one of them would leave
/// that item outside it, so it is refused, and changes nothing.
#[tokio::test]
async fn leave_refuses_a_time_before_the_items_stored() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let participation = app.participation().await;
    client
        .record_sentiment(proto::RecordSentimentRequest {
            participation_id: participation.id.clone(),
            sentiment: sentiments(100, 1).pop(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    client
        .record_event(proto::RecordEventRequest {
            participation_id: participation.id.clone(),
            event: Some(proto::NewEvent {
                occurred_at: at(t0(), 200),
                kind: proto::EventKind::TalkStarted as i32,
                attributes: Default::default(),
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    app.stream_sentiments(&participation.id, vec![sentiments(300, 2)])
        .await;

    // Before the sentiment's end (101 s), between it and the event, between the event
    // and the streamed items (which end at 302 s).
    for disconnect in [50, 100, 150, 250, 301] {
        let status = client
            .leave_session(leave(&participation.id, disconnect, 0))
            .await
            .unwrap_err();
        assert_eq!(
            violated_fields(&status),
            ["disconnected_at"],
            "leave at {disconnect} s: {status:?}"
        );
        assert!(
            status.message().contains("items stored"),
            "{}",
            status.message()
        );
    }
    assert_eq!(
        count(
            &app.db,
            "SELECT count(*) FROM participations \
             WHERE disconnected_at IS NULL AND talked_time_us IS NULL"
        )
        .await,
        1
    );

    // At the last item's end, it closes; the items are all still there.
    let left = client
        .leave_session(leave(&participation.id, 302, 10))
        .await
        .unwrap()
        .into_inner()
        .participation
        .unwrap();
    assert_eq!(left.disconnected_at, at(t0(), 302));
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 3);
    assert_eq!(count(&app.db, "SELECT count(*) FROM events").await, 1);
}

/// A leave waits for the items being written for its participation (each holds the
/// participation from its foreign-key check until its transaction ends), and is judged
/// against them once they are committed.
#[tokio::test]
async fn leave_waits_for_items_being_written_and_is_judged_with_them() {
    let app = spawn_app().await;
    let participation = app.participation().await;
    let mut writer = app.db.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label) \
         VALUES (gen_random_uuid(), $1::uuid, $2::uuid, $3, $4, 'neutral')",
    )
    .bind(&participation.user_id)
    .bind(&participation.id)
    .bind(t0() + chrono::TimeDelta::seconds(300))
    .bind(t0() + chrono::TimeDelta::seconds(301))
    .execute(&mut *writer)
    .await
    .unwrap();

    let mut client = app.client.clone();
    let request = leave(&participation.id, 200, 0);
    let leaving = tokio::spawn(async move { client.leave_session(request).await });
    eventually("the leave waits for the participation's lock", || async {
        count(
            &app.db,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT disconnected_at IS NULL%'",
        )
        .await
            == 1
    })
    .await;
    writer.commit().await.unwrap();

    let status = leaving.await.unwrap().unwrap_err();
    assert_eq!(violated_fields(&status), ["disconnected_at"], "{status:?}");
    assert_eq!(
        count(
            &app.db,
            "SELECT count(*) FROM participations WHERE disconnected_at IS NULL"
        )
        .await,
        1
    );
}

/// A server remembers the user of each participation it has seen, to read that user's
/// rows only. Another server deletes the user, and the participation's id (a client's
/// `request_id`) is taken again by another user's participation: the first server still
/// finds the participation as it is now, for every call that names it.
#[tokio::test]
async fn a_participation_whose_user_changed_behind_a_server_is_found_as_it_is() {
    let db = crate::helpers::fresh_database().await;
    let first = crate::helpers::spawn_app_on(db.clone()).await;
    let second = crate::helpers::spawn_app_on(db.clone()).await;
    first.upsert_timezone("UTC", 0).await;
    let session = first.create_session(t0()).await;
    let join = |user_id: &str| proto::JoinSessionRequest {
        request_id: "0d4c5a6e-8f1b-4c2d-9e3a-7b6c5d4e3f21".into(),
        user_id: user_id.into(),
        session_id: session.id.clone(),
        timezone_code: "UTC".into(),
        connected_at: at(t0(), 0),
    };
    let alice = first.create_user("alice").await;
    let mut client = first.client.clone();
    let joined = client
        .join_session(join(&alice.id))
        .await
        .unwrap()
        .into_inner();
    let id = joined.participation.unwrap().id;
    crate::helpers::fetch_participation(&mut client, &id).await;

    let mut other = second.client.clone();
    other
        .delete_user(proto::DeleteUserRequest {
            user_id: alice.id.clone(),
        })
        .await
        .unwrap();
    let bob = second.create_user("bob").await;
    let rejoined = other
        .join_session(join(&bob.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejoined.participation.unwrap().id, id);

    let found = crate::helpers::fetch_participation(&mut client, &id).await;
    assert_eq!(found.user_id, bob.id);
    let stored = first.stream_sentiments(&id, vec![sentiments(0, 3)]).await;
    assert_eq!(stored.items_stored, 3);
    let owner: String = sqlx::query_scalar(
        "SELECT DISTINCT user_id::text FROM sentiments WHERE participation_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(owner, bob.id);
}
