//! Prometheus metrics, served as text on a separate HTTP port (`GET /metrics`).
//!
//! Every call, as go-grpc-prometheus names them (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`,
//! `grpc_server_msg_received_total`, `grpc_server_msg_sent_total`, labelled `grpc_type`,
//! `grpc_service`, `grpc_method`, `grpc_code`): [`crate::grpc::middleware::rpc_metrics`].
//! The service's own:
//!
//! - `krisp_rpc_requests_total{method, code}`: finished calls by method and gRPC status;
//! - `krisp_items_ingested_total{kind}`: sentiments and events stored;
//! - `krisp_stream_commit_seconds`: time to finish and commit a stream's transaction;
//! - `krisp_stream_rows`: rows per committed stream;
//! - `krisp_active_streams`: client streams in progress; `krisp_streams_waiting`: of
//!   them, those waiting for their turn at a connection; `krisp_stream_connections`:
//!   connections held by streams to write (at most their share of the pool);
//! - `krisp_spool_bytes{medium}`: bytes of open streams' items waiting to be written, in
//!   `memory` and on `disk` (spill files); `krisp_spool_budget_bytes{medium}`: the
//!   budgets they fill (`--spool-memory-bytes`, `--spool-disk-bytes`);
//! - `krisp_serving`: 1 while the health service says SERVING, 0 while NOT_SERVING (the
//!   database out of reach, or shutting down);
//! - `krisp_live_feeds`: LiveFeed streams open; `krisp_feed_batch_appends`: appends
//!   committed together by one group commit of the feed writers;
//!   `krisp_live_feed_ack_seconds`: from an append read to its ack sent;
//!   `krisp_writer_queue{writers}`: appends (`feeds`) and unary records (`unary`)
//!   waiting for a group-commit writer;
//! - `krisp_db_seconds{family}`: database time by statement family (`feed_batch`,
//!   `unary_batch`, `stream_write`, `timeline_read`): one write or read, from its first
//!   statement to its commit or last row;
//! - `krisp_unary_batch_calls{kind}`: unary record calls written together by one group
//!   commit of the unary writers (`storage::batch`);
//! - `krisp_commits_in_doubt_total`: calls whose connection was lost while the database
//!   committed, found out by trying again (`service::settle`);
//!   `krisp_commits_unresolved_total`: of them, those the database did not answer in time
//!   for (answered with an unknown outcome);
//! - `krisp_db_pool_connections{state}`: pooled connections in use and idle;
//! - `krisp_load_shed_total`: calls refused by the concurrency limit;
//! - `krisp_partition_maintenance_total{outcome}`: partition maintenance rounds, `ok` or
//!   `failed`; `krisp_partition_maintenance_last_success_seconds`: when one last
//!   succeeded (Unix time); `krisp_partition_rows_moved_total{table}`: rows moved out of
//!   a default partition ([`crate::partitions`]).

use std::{convert::Infallible, net::SocketAddr, sync::OnceLock};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub const RPC_REQUESTS: &str = "krisp_rpc_requests_total";
pub const ITEMS_INGESTED: &str = "krisp_items_ingested_total";
pub const STREAM_COMMIT_SECONDS: &str = "krisp_stream_commit_seconds";
pub const STREAM_ROWS: &str = "krisp_stream_rows";
pub const ACTIVE_STREAMS: &str = "krisp_active_streams";
pub const POOL_CONNECTIONS: &str = "krisp_db_pool_connections";
pub const LOAD_SHED: &str = "krisp_load_shed_total";
pub const STREAMS_WAITING: &str = "krisp_streams_waiting";
pub const STREAM_CONNECTIONS: &str = "krisp_stream_connections";
pub const SPOOL_BYTES: &str = "krisp_spool_bytes";
pub const FEED_BATCH_APPENDS: &str = "krisp_feed_batch_appends";
pub const LIVE_FEEDS: &str = "krisp_live_feeds";
pub const UNARY_BATCH_CALLS: &str = "krisp_unary_batch_calls";
pub const COMMITS_IN_DOUBT: &str = "krisp_commits_in_doubt_total";
pub const COMMITS_UNRESOLVED: &str = "krisp_commits_unresolved_total";
pub const SPOOL_BUDGET_BYTES: &str = "krisp_spool_budget_bytes";
pub const SERVING: &str = "krisp_serving";
pub const LIVE_FEED_ACK_SECONDS: &str = "krisp_live_feed_ack_seconds";
pub const WRITER_QUEUE: &str = "krisp_writer_queue";
pub const DB_SECONDS: &str = "krisp_db_seconds";

pub const GRPC_STARTED: &str = "grpc_server_started_total";
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
pub const GRPC_MSG_RECEIVED: &str = "grpc_server_msg_received_total";
pub const GRPC_MSG_SENT: &str = "grpc_server_msg_sent_total";

/// Bucket bounds of the latencies: a unary call takes 0.3-3 ms here, an ack 5-50 ms, a
/// stream's commit up to seconds, a live stream minutes to hours (its last buckets).
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 1800.0, 7200.0,
];

/// Holds a gauge one higher while it lives, however what it counts ends.
pub struct Gauged(&'static str);

impl Gauged {
    pub fn up(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// Records the database time of one write or read of statement `family`.
pub fn db_time(family: &'static str, since: std::time::Instant) {
    metrics::histogram!(DB_SECONDS, "family" => family).record(since.elapsed().as_secs_f64());
}

/// Sets how many jobs wait in a writers' queue (`writers`: `feeds` or `unary`).
pub fn writer_queue<T>(writers: &'static str, queue: &tokio::sync::mpsc::Receiver<T>) {
    metrics::gauge!(WRITER_QUEUE, "writers" => writers).set(queue.len() as f64);
}

/// How long the metrics listener waits after a failed accept.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The process-wide recorder, installed on first use.
fn handle() -> anyhow::Result<&'static PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(STREAM_COMMIT_SECONDS.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(STREAM_ROWS.into()),
            &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7],
        )?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    Ok(HANDLE.get_or_init(|| handle))
}

/// Installs the process-wide recorder now, so that what happens before the endpoint is
/// served (the partition maintenance started with the database) is counted too.
pub fn install() -> anyhow::Result<()> {
    handle().map(|_| ())
}

/// Binds `address` and serves `/metrics` until the process ends. Returns the bound address.
pub async fn serve(address: SocketAddr, pool: PgPool) -> anyhow::Result<SocketAddr> {
    let handle = handle()?;
    // Series that exist from the start, so that dashboards and alerts see zeros.
    metrics::counter!(LOAD_SHED).increment(0);
    metrics::gauge!(ACTIVE_STREAMS).increment(0.0);
    metrics::gauge!(STREAMS_WAITING).increment(0.0);
    metrics::gauge!(STREAM_CONNECTIONS).increment(0.0);
    metrics::gauge!(LIVE_FEEDS).increment(0.0);
    for writers in ["feeds", "unary"] {
        metrics::gauge!(WRITER_QUEUE, "writers" => writers).set(0.0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!(crate::partitions::MAINTENANCE_RUNS, "outcome" => outcome).increment(0);
    }
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // E.g. out of file descriptors: wait instead of spinning on the error.
                    tracing::warn!(%error, "cannot accept a metrics connection");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let pool = pool.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let pool = pool.clone();
                    async move { Ok::<_, Infallible>(scrape(&request, handle, &pool)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "metrics connection failed");
                }
            });
        }
    });
    Ok(bound)
}

fn scrape<B>(
    request: &Request<B>,
    handle: &PrometheusHandle,
    pool: &PgPool,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"try /metrics\n")));
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
        return response;
    }
    let idle = pool.num_idle() as f64;
    let size = f64::from(pool.size());
    metrics::gauge!(POOL_CONNECTIONS, "state" => "idle").set(idle);
    metrics::gauge!(POOL_CONNECTIONS, "state" => "in_use").set((size - idle).max(0.0));
    let mut response = Response::new(Full::new(Bytes::from(handle.render())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
