//! A scrape of the Prometheus endpoint shows the counters move.

use std::net::SocketAddr;

use krisp_ingest::proto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::{TestApp, frames, fresh_database, sentiments};

pub(crate) async fn scrape(address: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the series whose line starts with `series` (0 when absent).
pub(crate) fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A server of its own (the real binary, its own process and so its own metrics
/// recorder): other tests of this binary calling the same RPCs in parallel cannot move
/// its counters, so exact deltas hold.
#[tokio::test]
async fn a_scrape_shows_the_counters_move() {
    let db = fresh_database().await;
    let served = crate::binary::serve_database(&db, &[]).await;
    let metrics = crate::binary::metrics_address(&served.logged);
    let app = TestApp::connect(served.address, db.clone()).await;

    let stream_ok = "krisp_rpc_requests_total{method=\"/krisp.ingest.v1.IngestService/StreamSentiments\",code=\"Ok\"}";
    let get_not_found = "krisp_rpc_requests_total{method=\"/krisp.ingest.v1.IngestService/GetUser\",code=\"NotFound\"}";
    let items = "krisp_items_ingested_total{kind=\"sentiments\"}";
    let before = scrape(metrics).await;

    let participation = app.participation().await;
    let messages = frames::stream(
        &Uuid::new_v4().to_string(),
        &participation.id,
        vec![sentiments(0, 60), sentiments(60, 60)],
    );
    let sent_messages = messages.len() as f64;
    app.client
        .clone()
        .stream_sentiments(tokio_stream::iter(messages))
        .await
        .unwrap();
    let status = app.get_unknown_user().await;
    assert_eq!(status.code(), tonic::Code::NotFound);
    app.client
        .clone()
        .record_sentiment(proto::RecordSentimentRequest {
            request_id: Uuid::new_v4().to_string(),
            participation_id: participation.id.clone(),
            sentiment: sentiments(1_000, 1).pop(),
        })
        .await
        .unwrap();

    // A live feed of two appends through the client crate's helper.
    crate::client_feed::feed_through(
        &app,
        &participation.id,
        vec![
            vec![crate::live::item(1), crate::live::item(2)],
            vec![crate::live::item(3)],
        ],
    )
    .await;

    // Paths no service serves: UNIMPLEMENTED, counted under "unknown" whatever they say.
    for path in [
        "/krisp.ingest.v1.IngestService/NoSuchMethod",
        "/made.up.Service/Anything",
    ] {
        let status = unserved_call(&app, path).await;
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}");
    }

    let after = scrape(metrics).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    // The go-grpc-prometheus family, with its labels.
    let stream = r#"grpc_type="client_stream",grpc_service="krisp.ingest.v1.IngestService",grpc_method="StreamSentiments""#;
    let get_user =
        r#"grpc_type="unary",grpc_service="krisp.ingest.v1.IngestService",grpc_method="GetUser""#;
    let live = r#"grpc_type="bidi_stream",grpc_service="krisp.ingest.v1.IngestService",grpc_method="LiveFeed""#;
    for (series, expected) in [
        (format!("grpc_server_started_total{{{stream}}}"), 1.0),
        (
            format!("grpc_server_handled_total{{{stream},grpc_code=\"OK\"}}"),
            1.0,
        ),
        (
            format!("grpc_server_msg_received_total{{{stream}}}"),
            sent_messages,
        ),
        (format!("grpc_server_msg_sent_total{{{stream}}}"), 1.0),
        (
            format!("grpc_server_handling_seconds_count{{{stream}}}"),
            1.0,
        ),
        (
            format!("grpc_server_handled_total{{{get_user},grpc_code=\"NotFound\"}}"),
            1.0,
        ),
        // Open, two appends, close; Opened, two acks, Closed.
        (format!("grpc_server_msg_received_total{{{live}}}"), 4.0),
        (format!("grpc_server_msg_sent_total{{{live}}}"), 4.0),
        ("krisp_live_feed_ack_seconds_count".to_owned(), 2.0),
    ] {
        assert_eq!(delta(&series), expected, "{series}:\n{after}");
    }
    let unknown = r#"grpc_type="unknown",grpc_service="unknown",grpc_method="unknown""#;
    let unknown_handled =
        format!("grpc_server_handled_total{{{unknown},grpc_code=\"Unimplemented\"}}");
    assert_eq!(delta(&unknown_handled), 2.0, "{after}");
    assert_eq!(
        delta("krisp_rpc_requests_total{method=\"unknown\",code=\"Unimplemented\"}"),
        2.0,
        "{after}"
    );
    for made_up in ["NoSuchMethod", "made.up", "Anything"] {
        assert!(!after.contains(made_up), "{made_up} in a label:\n{after}");
    }
    assert!(
        after.contains(r#"grpc_server_handling_seconds_bucket{grpc_type="unary",grpc_service="krisp.ingest.v1.IngestService",grpc_method="GetUser",le="0.0005"}"#),
        "{after}"
    );
    assert_eq!(
        value(&after, stream_ok) - value(&before, stream_ok),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(&after, get_not_found) - value(&before, get_not_found),
        1.0,
        "{after}"
    );
    assert!(
        value(&after, items) - value(&before, items) >= 124.0,
        "{after}"
    );
    let batches = "krisp_unary_batch_calls_count{kind=\"sentiments\"}";
    assert!(value(&after, batches) >= 1.0, "{after}");
    for series in [
        "krisp_stream_commit_seconds_bucket",
        "krisp_stream_rows_bucket",
        "krisp_active_streams",
        "krisp_load_shed_total",
        "krisp_streams_waiting",
        "krisp_stream_connections",
        "krisp_db_pool_connections{state=\"idle\"}",
        "krisp_db_pool_connections{state=\"in_use\"}",
        "krisp_db_seconds_count{family=\"stream_write\"}",
        "krisp_db_seconds_count{family=\"unary_batch\"}",
        "krisp_db_seconds_count{family=\"feed_batch\"}",
        "krisp_writer_queue{writers=\"feeds\"}",
        "krisp_writer_queue{writers=\"unary\"}",
        "krisp_live_feeds",
    ] {
        assert!(after.contains(series), "{series} missing:\n{after}");
    }
    drop(app);
    assert!(
        crate::binary::terminate(served.child, &served.lines)
            .await
            .success()
    );
}

/// A unary call of `path`, which no service serves, with an empty message.
async fn unserved_call(app: &TestApp, path: &'static str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.unary(
        tonic::Request::new(()),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .unwrap_err()
}
