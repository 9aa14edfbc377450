//! API keys on Citus (a reference table): created, listed and revoked with the real
//! binary against the coordinator, enforced by the server.

use std::time::Duration;

use krisp_ingest::proto;
use tonic::Code;

use crate::{
    auth::{create_user, with_key},
    helpers::{current_database, spawn_app_configured},
    require_citus,
};

#[tokio::test]
async fn api_keys_are_created_enforced_and_revoked_on_citus() {
    let cluster = require_citus!();
    let _shared = cluster.shared().await;
    // Keys apply to every server of a database: this test has one of its own.
    let db = cluster.database().await;
    let url = cluster.url(&current_database(&db).await);
    let writer = cluster.krisp_ingest(
        &url,
        &["keys", "create", "--name", "voice", "--scope", "ingest"],
    );
    let reader = cluster.krisp_ingest(
        &url,
        &["keys", "create", "--name", "dashboard", "--scope", "read"],
    );
    let (writer, reader) = (writer.trim(), reader.trim());
    let listed = cluster.krisp_ingest(&url, &["keys", "list"]);
    assert!(
        listed.contains("voice") && listed.contains("dashboard"),
        "{listed}"
    );

    let app = spawn_app_configured(db.clone(), |settings| {
        settings.key_refresh = Duration::from_millis(100);
    })
    .await;
    let mut client = app.client.clone();
    let status = client
        .create_user(create_user("anonymous"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = client
        .create_user(with_key(create_user("reader"), reader))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let user = client
        .create_user(with_key(create_user("writer"), writer))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    client
        .get_user(with_key(proto::GetUserRequest { user_id: user.id }, reader))
        .await
        .unwrap();

    cluster.krisp_ingest(&url, &["keys", "revoke", "--name", "voice"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = client
        .create_user(with_key(create_user("revoked"), writer))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(users, 1);
}
