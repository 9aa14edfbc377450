//! API keys: who gets in, with what scope, and that refused calls never reach the database.

use std::time::Duration;

use krisp_ingest::{
    app::check_exposure,
    auth::{self, Scope},
    proto::{self, ingest_service_client::IngestServiceClient},
};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest,
};

use crate::helpers::{count, fresh_database, spawn_app_configured};

#[tokio::test]
async fn the_authorization_scheme_is_case_insensitive() {
    let db = fresh_database().await;
    let key = auth::create_key(&db, "lower", &[Scope::Ingest, Scope::Read])
        .await
        .unwrap();
    let app = spawn_app_configured(db.clone(), |_| {}).await;
    let mut client: IngestServiceClient<Channel> = app.client.clone();
    for (n, scheme) in ["bearer", "BEARER"].into_iter().enumerate() {
        let mut request = Request::new(create_user(&format!("scheme-{n}")));
        request
            .metadata_mut()
            .insert("authorization", format!("{scheme} {key}").parse().unwrap());
        client.create_user(request).await.unwrap();
    }
    let mut request = Request::new(create_user("basic"));
    request
        .metadata_mut()
        .insert("authorization", format!("Basic {key}").parse().unwrap());
    let status = client.create_user(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 2);
}

#[tokio::test]
async fn the_first_key_created_while_the_server_runs_makes_keys_required_for_good() {
    let db = fresh_database().await;
    let app = spawn_app_configured(db.clone(), |settings| {
        settings.key_refresh = Duration::from_millis(100);
    })
    .await;
    let mut client: IngestServiceClient<Channel> = app.client.clone();
    // No key exists: loopback calls need none.
    client.create_user(create_user("before")).await.unwrap();
    let key = auth::create_key(&db, "first", &[Scope::Ingest])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = client
        .create_user(create_user("anonymous"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    client
        .create_user(with_key(create_user("with-key"), &key))
        .await
        .unwrap();
    // Revoking every key does not open the server again.
    assert!(auth::revoke_key(&db, "first").await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for request in [
        with_key(create_user("revoked"), &key),
        Request::new(create_user("none")),
    ] {
        let status = client.create_user(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 2);
}

pub(crate) fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

pub(crate) fn create_user(external_id: &str) -> proto::CreateUserRequest {
    proto::CreateUserRequest {
        external_id: external_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn keys_and_scopes_decide_who_may_call_what() {
    let db = fresh_database().await;
    let writer = auth::create_key(&db, "voice-service", &[Scope::Ingest])
        .await
        .unwrap();
    let reader = auth::create_key(&db, "dashboard", &[Scope::Read])
        .await
        .unwrap();
    let admin = auth::create_key(&db, "ops", &[Scope::Ingest, Scope::Read])
        .await
        .unwrap();
    // The application loads the keys itself, as main's does.
    let app = spawn_app_configured(db.clone(), |settings| {
        settings.key_refresh = Duration::from_millis(100);
    })
    .await;
    let mut client: IngestServiceClient<Channel> = app.client.clone();

    // Stored hashed: no column holds a key.
    let stored: Vec<(String, Vec<u8>)> = sqlx::query_as("SELECT name, key_hash FROM api_keys")
        .fetch_all(&db)
        .await
        .unwrap();
    for (_, hash) in &stored {
        for key in [&writer, &reader, &admin] {
            assert!(
                !hash
                    .windows(16)
                    .any(|w| key.as_bytes().windows(16).any(|k| k == w))
            );
        }
    }

    // Missing or wrong key: UNAUTHENTICATED, and the database is not touched.
    let status = client.create_user(create_user("no-key")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .create_user(with_key(create_user("bad-key"), "krisp_nope"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut malformed = Request::new(create_user("basic-auth"));
    malformed
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
    assert_eq!(
        client.create_user(malformed).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // Right key, wrong scope: PERMISSION_DENIED, nothing stored.
    let status = client
        .create_user(with_key(create_user("reader-writes"), &reader))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM users").await, 0);

    // Right key and scope.
    let user = client
        .create_user(with_key(create_user("ok"), &writer))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let read = with_key(
        proto::GetUserRequest {
            user_id: user.id.clone(),
        },
        &reader,
    );
    assert_eq!(
        client
            .get_user(read)
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap(),
        user
    );
    let status = client
        .get_user(with_key(
            proto::GetUserRequest {
                user_id: user.id.clone(),
            },
            &writer,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    client
        .list_timezones(with_key(proto::ListTimezonesRequest {}, &admin))
        .await
        .unwrap();

    // Health needs no key; reflection needs one (any scope).
    let health = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let refused = reflection
        .server_reflection_info(tokio_stream::iter(vec![list()]))
        .await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().code(),
        Code::Unauthenticated
    );
    let allowed = reflection
        .server_reflection_info(with_key(tokio_stream::iter(vec![list()]), &reader))
        .await;
    assert!(allowed.is_ok(), "{allowed:?}");

    // A revoked key stops working once the server re-reads the keys.
    assert!(auth::revoke_key(&db, "voice-service").await.unwrap());
    let mut refused_after_revoke = false;
    for _ in 0..50 {
        let status = client
            .create_user(with_key(create_user("after-revoke"), &writer))
            .await;
        if status
            .as_ref()
            .is_err_and(|s| s.code() == Code::Unauthenticated)
        {
            refused_after_revoke = true;
            break;
        }
        assert!(
            status.is_ok()
                || status
                    .as_ref()
                    .is_err_and(|s| s.code() == Code::AlreadyExists)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused_after_revoke, "the revoked key still works");
}

#[test]
fn without_keys_only_loopback_is_served_unless_insecure() {
    let public = "0.0.0.0:50051".parse().unwrap();
    let loopback = "127.0.0.1:50051".parse().unwrap();
    let error = check_exposure(public, false, false)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("keys create") && error.contains("--insecure"),
        "{error}"
    );
    assert!(check_exposure(public, false, true).is_ok());
    assert!(check_exposure(public, true, false).is_ok());
    assert!(check_exposure(loopback, false, false).is_ok());
    assert!(check_exposure("[::1]:50051".parse().unwrap(), false, false).is_ok());
}
