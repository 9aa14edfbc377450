//! DeleteUser at scale: the cascade follows indexed keys only (so its cost is the user's
//! own rows, not the table's), and its statements stop with the call, at the deadline or
//! when the client cancels, instead of running on in PostgreSQL for nobody.

use std::time::Duration;

use krisp_ingest::proto;
use sqlx::PgPool;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{TestApp, count, eventually, sentiments, spawn_app};

/// Backends of the test database running the DeleteUser statement right now.
async fn running_deletes(db: &PgPool) -> i64 {
    count(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND state = 'active' \
         AND query LIKE 'DELETE FROM user_external_ids%'",
    )
    .await
}

/// A user whose participation row a transaction of the test holds (FOR UPDATE): their
/// deletion waits for that lock as long as the test wants.
async fn user_held_by_a_lock(
    app: &TestApp,
) -> (
    proto::Participation,
    sqlx::Transaction<'static, sqlx::Postgres>,
) {
    let participation = app.participation().await;
    let mut blocker = app.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM participations WHERE id = $1 FOR UPDATE")
        .bind(Uuid::parse_str(&participation.id).unwrap())
        .execute(&mut *blocker)
        .await
        .unwrap();
    (participation, blocker)
}

async fn user_exists(app: &TestApp, user_id: &str) -> bool {
    app.client
        .clone()
        .get_user(proto::GetUserRequest {
            user_id: user_id.to_owned(),
        })
        .await
        .is_ok()
}

/// While the lock is still held, nothing waits for it any more; once it is released, the
/// user is still there (the DELETE rolled back).
async fn stopped_in_postgres(
    app: &TestApp,
    participation: &proto::Participation,
    blocker: sqlx::Transaction<'static, sqlx::Postgres>,
) {
    eventually("the DELETE stopped in PostgreSQL", || async {
        running_deletes(&app.db).await == 0
    })
    .await;
    blocker.rollback().await.unwrap();
    assert!(user_exists(app, &participation.user_id).await);
}

#[tokio::test]
async fn delete_user_stops_in_postgres_when_the_deadline_passes() {
    let app = spawn_app().await;
    let (participation, blocker) = user_held_by_a_lock(&app).await;
    let mut request = tonic::Request::new(proto::DeleteUserRequest {
        user_id: participation.user_id.clone(),
    });
    request.set_timeout(Duration::from_millis(800));
    let status = app.client.clone().delete_user(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    stopped_in_postgres(&app, &participation, blocker).await;
}

#[tokio::test]
async fn delete_user_stops_in_postgres_when_the_client_cancels() {
    let app = spawn_app().await;
    let (participation, blocker) = user_held_by_a_lock(&app).await;
    let mut client = app.client.clone();
    let user_id = participation.user_id.clone();
    let call = tokio::spawn(async move {
        client
            .delete_user(proto::DeleteUserRequest { user_id })
            .await
    });
    eventually("the DELETE waits for the lock", || async {
        running_deletes(&app.db).await == 1
    })
    .await;
    // The client gives up: its call is dropped (HTTP/2 RST_STREAM).
    call.abort();
    stopped_in_postgres(&app, &participation, blocker).await;
}

#[tokio::test]
async fn delete_user_removes_streamed_and_unary_rows_of_that_user_only() {
    let app = spawn_app().await;
    let doomed = app.participation().await;
    let kept = app.participation().await;
    for participation in [&doomed, &kept] {
        for _ in 0..3 {
            app.stream_sentiments(&participation.id, vec![sentiments(0, 50)])
                .await;
        }
        app.client
            .clone()
            .record_sentiment(proto::RecordSentimentRequest {
                participation_id: participation.id.clone(),
                sentiment: sentiments(500, 1).pop(),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    let deleted = app
        .client
        .clone()
        .delete_user(proto::DeleteUserRequest {
            user_id: doomed.user_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.participations_deleted, 1);
    let of =
        |table: &str, user: &str| format!("SELECT count(*) FROM {table} WHERE user_id = '{user}'");
    for (user, rows, streams) in [(&doomed.user_id, 0, 0), (&kept.user_id, 151, 3)] {
        assert_eq!(count(&app.db, &of("sentiments", user)).await, rows);
        assert_eq!(count(&app.db, &of("ingest_streams", user)).await, streams);
    }
}
