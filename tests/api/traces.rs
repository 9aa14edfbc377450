//! Traces over OTLP against a receiver of the OTLP/gRPC protocol the test runs (built
//! from the official opentelemetry-proto definitions): a call that carries a W3C
//! `traceparent` yields spans in that trace, the call's span a child of the client's,
//! the service step and the database work below it, and no request field in any
//! attribute; a call without one starts a trace of its own.

use std::collections::HashMap;
use std::time::Duration;

use krisp_ingest::proto;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::{Span, span::SpanKind},
};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::helpers::{TestApp, fresh_database};

struct Receiver(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The chain of span names from `span` up to the root of what was exported.
fn ancestors<'a>(span: &'a Span, by_id: &HashMap<Vec<u8>, &'a Span>) -> Vec<&'a str> {
    let mut names = Vec::new();
    let mut current = by_id.get(&span.parent_span_id);
    while let Some(parent) = current {
        names.push(parent.name.as_str());
        current = by_id.get(&parent.parent_span_id);
    }
    names
}

#[tokio::test]
async fn a_call_with_a_traceparent_is_traced_into_its_service_step_and_database_work() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let (exported, mut received) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(exported)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let db = fresh_database().await;
    let endpoint = format!("http://{collector}");
    let served = crate::binary::serve_database(&db, &[("KRISP_OTLP_ENDPOINT", &endpoint)]).await;
    let app = TestApp::connect(served.address, db.clone()).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let external_id = format!("traced-{}", Uuid::new_v4());
    let mut request = tonic::Request::new(proto::CreateUserRequest {
        external_id: external_id.clone(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let user = app
        .client
        .clone()
        .create_user(request)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    // And one without a traceparent.
    app.client
        .clone()
        .get_user(proto::GetUserRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap();
    drop(app);
    // A clean stop exports what is left.
    assert!(
        crate::binary::terminate(served.child, &served.lines)
            .await
            .success()
    );

    let mut spans = Vec::new();
    while let Ok(Some(batch)) =
        tokio::time::timeout(Duration::from_millis(500), received.recv()).await
    {
        for resource in batch.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| format!("{:?}", a.value));
            assert!(
                service.as_ref().is_some_and(|s| s.contains("krisp-ingest")),
                "{service:?}"
            );
            spans.extend(resource.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }
    let summary: Vec<String> = spans
        .iter()
        .map(|s| {
            format!(
                "{} {} parent {} kind {} {:?}",
                s.name,
                hex(&s.trace_id),
                hex(&s.parent_span_id),
                s.kind,
                s.attributes.iter().map(|a| &a.key).collect::<Vec<_>>()
            )
        })
        .collect();
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let by_id: HashMap<Vec<u8>, &Span> = ours.iter().map(|s| (s.span_id.clone(), *s)).collect();

    let call = ours
        .iter()
        .find(|s| s.name == "krisp.ingest.v1.IngestService/CreateUser")
        .unwrap_or_else(|| panic!("no call span in the client's trace: {summary:#?}"));
    assert_eq!(hex(&call.parent_span_id), client_span, "{summary:#?}");
    assert_eq!(call.kind, SpanKind::Server as i32);
    let step = ours
        .iter()
        .find(|s| s.name == "create_user")
        .unwrap_or_else(|| panic!("no service step: {summary:#?}"));
    assert!(
        ancestors(step, &by_id).contains(&call.name.as_str()),
        "{summary:#?}"
    );
    let database = ours
        .iter()
        .find(|s| s.name == "insert_user")
        .unwrap_or_else(|| panic!("no database span: {summary:#?}"));
    assert!(
        ancestors(database, &by_id).contains(&"create_user"),
        "{summary:#?}"
    );
    assert_eq!(database.kind, SpanKind::Client as i32, "{summary:#?}");
    assert!(
        database
            .attributes
            .iter()
            .any(|a| a.key == "db.system" && format!("{:?}", a.value).contains("postgresql")),
        "{database:?}"
    );
    // No request field in any attribute of any span.
    for span in &spans {
        let attributes = format!("{:?}", span.attributes);
        assert!(!attributes.contains(&external_id), "{span:?}");
    }
    // The call without a traceparent has a trace of its own.
    let other = spans
        .iter()
        .find(|s| s.name == "krisp.ingest.v1.IngestService/GetUser")
        .unwrap_or_else(|| panic!("no GetUser span: {summary:#?}"));
    assert_ne!(hex(&other.trace_id), trace_id);
    assert!(other.parent_span_id.is_empty(), "{other:?}");
}
