//! Health, reflection and behaviour when the database is unreachable.

use std::time::Duration;

use krisp_ingest::proto;
use sqlx::postgres::PgPoolOptions;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::helpers::{spawn_app, spawn_app_on};

async fn health(channel: tonic::transport::Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

#[tokio::test]
async fn health_serves_when_the_database_is_up() {
    let app = spawn_app().await;
    for service in ["", "krisp.ingest.v1.IngestService"] {
        let mut status = health(app.channel.clone(), service).await;
        for _ in 0..100 {
            if status == ServingStatus::Serving {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            status = health(app.channel.clone(), service).await;
        }
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
}

#[tokio::test]
async fn an_unreachable_database_means_not_serving_and_unavailable() {
    // The server starts over a reachable database, which then goes away: the link to it
    // is cut, and every new connection attempt is refused.
    let db = crate::helpers::fresh_database().await;
    let mut link =
        crate::helpers::CuttableLink::to(&crate::helpers::current_database(&db).await).await;
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(link.options().await)
        .await
        .unwrap();
    let app = spawn_app_on(pool).await;
    link.cut();
    let mut status = health(app.channel.clone(), "krisp.ingest.v1.IngestService").await;
    for _ in 0..100 {
        if status == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = health(app.channel.clone(), "krisp.ingest.v1.IngestService").await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    assert_eq!(
        health(app.channel.clone(), "").await,
        ServingStatus::NotServing
    );

    let error = app
        .client
        .clone()
        .create_user(proto::CreateUserRequest {
            external_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    assert!(
        !error.message().contains("127.0.0.1:1"),
        "no internals: {}",
        error.message()
    );
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    let app = spawn_app().await;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![
            request(MessageRequest::ListServices(String::new())),
            request(MessageRequest::FileContainingSymbol(
                "krisp.ingest.v1.IngestService".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();

    let listed = next_answer(&mut responses).await;
    let MessageResponse::ListServicesResponse(list) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "krisp.ingest.v1.IngestService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    let described = next_answer(&mut responses).await;
    let MessageResponse::FileDescriptorResponse(files) = described else {
        panic!("expected file descriptors, got {described:?}");
    };
    use prost::Message;
    let files: Vec<_> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .collect();
    let service = files
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "IngestService")
        .expect("IngestService is described");
    let methods: Vec<_> = service.method.iter().map(|m| m.name()).collect();
    assert!(
        methods.contains(&"StreamSentiments") && methods.contains(&"GetTimeline"),
        "{methods:?}"
    );
    let streaming = service
        .method
        .iter()
        .find(|m| m.name() == "StreamSentiments")
        .unwrap();
    assert!(streaming.client_streaming());
}

#[tokio::test]
async fn reflection_v1alpha_is_served_for_older_tools() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = spawn_app().await;
    let mut responses = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let response = responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap();
    let MessageResponse::ListServicesResponse(list) = response else {
        panic!("expected a service list, got {response:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "krisp.ingest.v1.IngestService")
    );
}

#[tokio::test]
async fn every_call_gets_a_request_id_echoed_in_its_metadata() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let mut request = tonic::Request::new(proto::ListTimezonesRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "trace-42".parse().unwrap());
    let response = client.list_timezones(request).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "trace-42");

    // Errors carry it too; without one, the server makes one up.
    let status = client
        .get_user(proto::GetUserRequest {
            user_id: "bad".into(),
        })
        .await
        .unwrap_err();
    let generated = status
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");
    // An unusable id (spaces) is replaced, not echoed.
    let mut request = tonic::Request::new(proto::ListTimezonesRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "not usable".parse().unwrap());
    let response = client.list_timezones(request).await.unwrap();
    assert_ne!(
        response.metadata().get("x-request-id").unwrap(),
        "not usable"
    );
}

/// The next answer of a reflection stream.
async fn next_answer(
    responses: &mut tonic::Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
) -> MessageResponse {
    responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

/// Load is not an outage: with every pooled connection in use, health still says
/// SERVING, because it probes the database over a connection of its own.
#[tokio::test]
async fn a_busy_pool_is_still_serving() {
    let db = crate::helpers::fresh_database().await;
    let options = (*db.connect_options()).clone();
    let small = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap();
    let app = spawn_app_on(small.clone()).await;
    // Every connection of the service's pool, held.
    let held = [
        small.acquire().await.unwrap(),
        small.acquire().await.unwrap(),
    ];
    // Longer than a probe's timeout (3 s) after the next probe (every 2 s).
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for service in ["", "krisp.ingest.v1.IngestService"] {
            assert_eq!(
                health(app.channel.clone(), service).await,
                ServingStatus::Serving
            );
        }
    }
    drop(held);
}
