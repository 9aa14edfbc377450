//! Side-by-side ingestion benchmark: on one PostgreSQL and one schema, in one run, it
//! loads the same sentiment rows with
//! 1. `copy`: binary `COPY ... FROM STDIN` straight into the tables (the limit),
//! 2. `row-by-row`: one INSERT per row in one transaction (the original pipeline),
//! 3. `grpc-stream`: krisp-ingest end to end, tonic clients streaming over loopback,
//! 4. `grpc-unary`: RecordSentiment against the same single-row INSERT through sqlx,
//!
//! and reports rows/s, latencies, CPU time per process, and the server's peak RSS during
//! one long stream; then `delete-user` ([`delete_user`]): DeleteUser in a large table,
//! and what the schema that makes it fast costs stream ingest. It ends with
//! `stream/copy ratio: X.XX`.
//!
//! The server runs as a child process (this binary, `serve` subcommand), so its memory
//! and CPU are measured on their own.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chrono::{DateTime, TimeDelta, Utc};
use clap::{Parser, Subcommand};
use futures_util::stream;
use krisp_ingest::{
    app::Application,
    domain::{
        self, ItemClock, NewSentiment, Participation, SentimentLabel, StreamHeader, TimezoneCode,
    },
    local_postgres::{self, LocalPostgres},
    partitions::{self, PartitionArgs, Partitioning, PartmanMode},
    proto::to_timestamp,
    proto::{self, ingest_service_client::IngestServiceClient, stream_sentiments_request::Frame},
    service::{IngestService, StreamLimits},
    storage::{self, Storage},
};
use sqlx::{
    Connection, Executor, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

mod delete_user;

const BENCH_DATABASE: &str = "krisp_bench";

#[derive(Debug, Parser)]
#[command(name = "krisp-bench", about = "krisp-ingest ingestion benchmark")]
struct Args {
    /// PostgreSQL server to benchmark on (its `krisp_bench` database is recreated).
    /// Default: the local cluster krisp-ingest uses with no configuration.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Data directory of the local cluster (when DATABASE_URL is unset).
    #[arg(long, env = "KRISP_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Rows per measurement of copy and grpc-stream.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Rows for row-by-row (slow; rows/s is what is compared).
    #[arg(long, default_value_t = 50_000)]
    row_by_row_rows: u64,
    /// Concurrent streams to measure grpc-stream with (the rows are split between them).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    streams: Vec<usize>,
    /// Sentiments per stream message.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Requests per measurement of grpc-unary and sqlx-insert.
    #[arg(long, default_value_t = 4000)]
    unary_requests: usize,
    /// Concurrency levels of grpc-unary and sqlx-insert.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    unary_concurrency: Vec<usize>,
    /// Rows of the single stream during which the server's peak RSS is measured.
    #[arg(long, default_value_t = 1_000_000)]
    rss_rows: u64,
    /// Rounds of every measurement; the report shows the median round.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// How sentiments and events are partitioned: `auto` has pg_partman make daily
    /// partitions (rows land in the partition of their day), `off` keeps only the
    /// default partition, as a server without pg_partman does.
    #[arg(long, value_enum, default_value_t = PartmanMode::Auto)]
    partitions: PartmanMode,
    /// delete-user: rows of other users in the table (0: skip the scenario).
    #[arg(long, default_value_t = 4_000_000)]
    delete_table_rows: u64,
    /// delete-user: streams of the deleted user.
    #[arg(long, default_value_t = 400)]
    delete_streams: u64,
    /// delete-user: rows per stream of the deleted user.
    #[arg(long, default_value_t = 500)]
    delete_stream_rows: u64,
    /// Where to write the chart (SVG) of rows/s by method.
    #[arg(long, default_value = "docs/benchmarks.svg")]
    chart: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// (internal) Serve krisp-ingest on the benchmark database; prints the address.
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = 64)]
        max_connections: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.command {
        Some(Command::Serve { max_connections }) => serve(&args, *max_connections).await,
        None => run(&args).await,
    }
}

/// Connect options for `database` on the benchmark's server.
async fn server_options(args: &Args, database: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(match &args.database_url {
        Some(url) => url.parse::<PgConnectOptions>()?.database(database),
        None => {
            let dir = args
                .data_dir
                .clone()
                .unwrap_or_else(local_postgres::default_data_dir);
            LocalPostgres::ensure(&dir).await?.connect_options(database)
        }
    })
}

async fn serve(args: &Args, max_connections: u32) -> anyhow::Result<()> {
    let pool = krisp_ingest::app::pool_options(max_connections)
        .connect_with(server_options(args, BENCH_DATABASE).await?)
        .await?;
    let app = Application::build(krisp_ingest::app::Settings::default(), pool).await?;
    println!("listening on {}", app.local_addr());
    app.run_until_stopped(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// A sentiment server child process.
struct Server {
    child: tokio::process::Child,
    address: std::net::SocketAddr,
    pid: u32,
}

impl Server {
    /// Starts a server whose pool holds up to `max_connections` connections.
    async fn start(args: &Args, max_connections: usize) -> anyhow::Result<Self> {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        if let Some(url) = &args.database_url {
            command.arg("--database-url").arg(url);
        }
        if let Some(dir) = &args.data_dir {
            command.arg("--data-dir").arg(dir);
        }
        let mut child = command
            .arg("serve")
            .arg("--max-connections")
            .arg(max_connections.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let line = lines
                .next_line()
                .await?
                .context("server exited before listening")?;
            if let Some(address) = line.strip_prefix("listening on ") {
                break address.trim().parse()?;
            }
        };
        let pid = child.id().context("server has no pid")?;
        Ok(Self {
            child,
            address,
            pid,
        })
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", self.address))?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .connect()
            .await?)
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        self.child.wait().await?;
        Ok(())
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds of each PostgreSQL process on the machine, by pid.
fn postgres_cpu_seconds() -> std::collections::HashMap<String, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("postgres"))
        })
        .map(|pid| {
            // schedstat: nanoseconds on CPU (PostgreSQL processes are single-threaded).
            let seconds = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .ok()
                .and_then(|s| {
                    s.split_whitespace()
                        .next()
                        .and_then(|ns| ns.parse::<f64>().ok())
                })
                .map_or_else(|| cpu_seconds(&pid), |ns| ns / 1e9);
            (pid, seconds)
        })
        .collect()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU used by the client (this process), the server and PostgreSQL during a measurement.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    client: f64,
    server: f64,
    postgres: f64,
}

struct CpuProbe {
    server_pid: Option<u32>,
    start: Cpu,
    postgres: std::collections::HashMap<String, f64>,
}

impl CpuProbe {
    fn now(server_pid: Option<u32>) -> Cpu {
        Cpu {
            client: cpu_seconds("self"),
            server: server_pid.map_or(0.0, |pid| cpu_seconds(&pid.to_string())),
            postgres: 0.0,
        }
    }

    fn start(server_pid: Option<u32>) -> Self {
        Self {
            server_pid,
            start: Self::now(server_pid),
            postgres: postgres_cpu_seconds(),
        }
    }

    /// CPU used since start. PostgreSQL processes that exited in between are not counted.
    fn stop(&self) -> Cpu {
        let end = Self::now(self.server_pid);
        let postgres = postgres_cpu_seconds()
            .into_iter()
            .map(|(pid, seconds)| seconds - self.postgres.get(&pid).copied().unwrap_or(0.0))
            .sum();
        Cpu {
            client: end.client - self.start.client,
            server: end.server - self.start.server,
            postgres,
        }
    }
}

/// One line of the results.
struct Measurement {
    method: String,
    concurrency: usize,
    rows: u64,
    elapsed: Duration,
    latency: Option<(Duration, Duration)>,
    cpu: Cpu,
}

impl Measurement {
    fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The benchmark's data: each measurement writes to participations of its own.
struct Fixtures {
    pool: PgPool,
    /// The service's use cases over `pool`, for `copy`.
    service: IngestService,
    session_id: Uuid,
    base: DateTime<Utc>,
}

impl Fixtures {
    /// `span_rows`: the most rows one measurement writes for one participation; they end
    /// before now, since the server refuses items dated ahead of its clock.
    async fn new(pool: PgPool, span_rows: u64) -> anyhow::Result<Self> {
        // Whole hours back, so that the rows of the default sizes fall in the partitions
        // pg_partman made around now (4 days either way).
        let span = i64::try_from(span_rows / 10)? + 3600;
        let now = Utc::now().timestamp();
        let base = DateTime::from_timestamp(now - now % 3600 - (span - span % 3600), 0)
            .context("base time")?;
        sqlx::query("INSERT INTO timezones (code, utc_offset_seconds) VALUES ('UTC', 0)")
            .execute(&pool)
            .await?;
        let session_id = Uuid::now_v7();
        sqlx::query("INSERT INTO sessions (id, session_type, started_at) VALUES ($1, 'call', $2)")
            .bind(session_id)
            .bind(base)
            .execute(&pool)
            .await?;
        let service = IngestService::new(
            Storage::new(pool.clone()),
            StreamLimits {
                max_items: u64::MAX,
                max_duration: Duration::from_secs(24 * 3600),
            },
            ItemClock::default(),
            tokio_util::sync::CancellationToken::new(),
        );
        Ok(Self {
            pool,
            service,
            session_id,
            base,
        })
    }

    /// A new user with an open participation in the benchmark session.
    async fn participation(&self) -> anyhow::Result<Participation> {
        let user_id = Uuid::now_v7();
        sqlx::query(
            "WITH claimed AS (INSERT INTO user_external_ids (external_id, user_id) \
                              VALUES ($2, $1) RETURNING user_id) \
             INSERT INTO users (id, external_id) SELECT user_id, $2 FROM claimed",
        )
        .bind(user_id)
        .bind(user_id.to_string())
        .execute(&self.pool)
        .await?;
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO participations (id, user_id, session_id, timezone_code, connected_at) \
             VALUES ($1, $2, $3, 'UTC', $4)",
        )
        .bind(id)
        .bind(user_id)
        .bind(self.session_id)
        .bind(self.base)
        .execute(&self.pool)
        .await?;
        Ok(Participation {
            id,
            user_id,
            session_id: self.session_id,
            timezone_code: TimezoneCode::parse("UTC").map_err(anyhow::Error::msg)?,
            connected_at: self.base,
            disconnected_at: None,
            usage: None,
        })
    }

    /// The i-th sentiment: 100 ms segments, back to back.
    fn sentiment(&self, i: u64) -> NewSentiment {
        let ms = i64::try_from(i).unwrap_or(i64::MAX / 1000) * 100;
        let labels = [
            SentimentLabel::Positive,
            SentimentLabel::Neutral,
            SentimentLabel::Negative,
        ];
        NewSentiment {
            started_at: self.base + TimeDelta::milliseconds(ms),
            ended_at: self.base + TimeDelta::milliseconds(ms + 100),
            label: labels[(i % 3) as usize],
            score: Some((i % 200) as f64 / 100.0 - 1.0),
        }
    }

    fn proto_sentiment(&self, i: u64) -> proto::NewSentiment {
        let s = self.sentiment(i);
        proto::NewSentiment {
            started_at: Some(to_timestamp(s.started_at)),
            ended_at: Some(to_timestamp(s.ended_at)),
            label: match s.label {
                SentimentLabel::Positive => proto::SentimentLabel::Positive,
                SentimentLabel::Neutral => proto::SentimentLabel::Neutral,
                SentimentLabel::Negative => proto::SentimentLabel::Negative,
            } as i32,
            score: s.score,
        }
    }

    async fn stored(&self, participation: &Participation) -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sentiments WHERE user_id = $1 AND participation_id = $2",
        )
        .bind(participation.user_id)
        .bind(participation.id)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n)?)
    }
}

/// copy: what the service does in a stream, without gRPC: its stream use case
/// (`IngestService::ingest_stream`: one transaction, the stream record, each item checked
/// and sent by binary COPY), fed the same batches in-process; `sessions` of them at once,
/// each with its share.
async fn bench_copy(fx: &Arc<Fixtures>, rows: u64, sessions: usize) -> anyhow::Result<Measurement> {
    let per_session = rows / sessions as u64;
    let mut participations = Vec::new();
    for _ in 0..sessions {
        participations.push(fx.participation().await?);
    }
    let probe = CpuProbe::start(None);
    let started = Instant::now();
    let tasks: Vec<_> = participations
        .iter()
        .cloned()
        .map(|participation| tokio::spawn(copy_rows(Arc::clone(fx), participation, per_session)))
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let cpu = probe.stop();
    for participation in &participations {
        check_stored(fx, participation, per_session).await?;
    }
    Ok(Measurement {
        method: "copy".into(),
        concurrency: sessions,
        rows: per_session * sessions as u64,
        elapsed,
        latency: None,
        cpu,
    })
}

async fn copy_rows(
    fx: Arc<Fixtures>,
    participation: Participation,
    rows: u64,
) -> anyhow::Result<()> {
    const BATCH: u64 = 1000;
    let header = StreamHeader {
        stream_id: Uuid::new_v4(),
        participation_id: participation.id,
    };
    let batches = (0..rows.div_ceil(BATCH)).map(|b| {
        let items = (b * BATCH..((b + 1) * BATCH).min(rows)).map(|i| fx.sentiment(i));
        Ok(domain::Frame::Batch(items.collect()))
    });
    let frames = std::iter::once(Ok(domain::Frame::Header(header)))
        .chain(batches)
        .chain(std::iter::once(Ok(domain::Frame::Trailer {
            item_count: rows,
        })));
    let receipt = fx
        .service
        .ingest_stream::<NewSentiment, _>(stream::iter(frames))
        .await?;
    anyhow::ensure!(receipt.items_stored == rows, "{receipt:?}");
    Ok(())
}

/// row-by-row: one INSERT per row, in one transaction.
async fn bench_row_by_row(fx: &Fixtures, rows: u64) -> anyhow::Result<Measurement> {
    let participation = fx.participation().await?;
    let probe = CpuProbe::start(None);
    let started = Instant::now();
    let mut tx = fx.pool.begin().await?;
    for i in 0..rows {
        let s = fx.sentiment(i);
        sqlx::query(
            "INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label, score) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::now_v7())
        .bind(participation.user_id)
        .bind(participation.id)
        .bind(s.started_at)
        .bind(s.ended_at)
        .bind(s.label.as_str())
        .bind(s.score)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let elapsed = started.elapsed();
    let cpu = probe.stop();
    check_stored(fx, &participation, rows).await?;
    Ok(Measurement {
        method: "row-by-row".into(),
        concurrency: 1,
        rows,
        elapsed,
        latency: None,
        cpu,
    })
}

async fn check_stored(
    fx: &Fixtures,
    participation: &Participation,
    rows: u64,
) -> anyhow::Result<()> {
    let stored = fx.stored(participation).await?;
    if stored != rows {
        bail!("expected {rows} rows stored, found {stored}");
    }
    Ok(())
}

/// Streams `rows` sentiments for `participation` in one stream on `channel`.
async fn stream_rows(
    fx: Arc<Fixtures>,
    channel: Channel,
    participation: Participation,
    rows: u64,
    batch_size: usize,
) -> anyhow::Result<u64> {
    let batch = batch_size as u64;
    let header = proto::StreamSentimentsRequest {
        frame: Some(Frame::Header(proto::StreamHeader {
            stream_id: Uuid::new_v4().to_string(),
            participation_id: participation.id.to_string(),
        })),
    };
    let trailer = proto::StreamSentimentsRequest {
        frame: Some(Frame::Trailer(proto::StreamTrailer { item_count: rows })),
    };
    let generator = Arc::clone(&fx);
    // Batches are generated as the client sends them, as a voice service would.
    let batches = stream::iter((0..rows.div_ceil(batch)).map(move |b| {
        let sentiments = (b * batch..((b + 1) * batch).min(rows))
            .map(|i| generator.proto_sentiment(i))
            .collect();
        proto::StreamSentimentsRequest {
            frame: Some(Frame::Batch(proto::SentimentBatch { sentiments })),
        }
    }));
    let messages = futures_util::StreamExt::chain(
        futures_util::StreamExt::chain(stream::iter([header]), batches),
        stream::iter([trailer]),
    );
    let receipt = IngestServiceClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .stream_sentiments(messages)
        .await?
        .into_inner()
        .receipt
        .context("no receipt")?;
    check_stored(&fx, &participation, rows).await?;
    Ok(receipt.items_stored)
}

async fn bench_grpc_stream(
    fx: &Arc<Fixtures>,
    server: &Server,
    rows: u64,
    streams: usize,
    batch_size: usize,
) -> anyhow::Result<Measurement> {
    let per_stream = rows / streams as u64;
    let mut prepared = Vec::new();
    for _ in 0..streams {
        prepared.push((fx.participation().await?, server.channel().await?));
    }
    let probe = CpuProbe::start(Some(server.pid));
    let started = Instant::now();
    let tasks: Vec<_> = prepared
        .into_iter()
        .map(|(participation, channel)| {
            tokio::spawn(stream_rows(
                Arc::clone(fx),
                channel,
                participation,
                per_stream,
                batch_size,
            ))
        })
        .collect();
    let mut stored = 0;
    for task in tasks {
        stored += task.await??;
    }
    let elapsed = started.elapsed();
    Ok(Measurement {
        method: "grpc-stream".into(),
        concurrency: streams,
        rows: stored,
        elapsed,
        latency: None,
        cpu: probe.stop(),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs `requests` calls of `call` from `concurrency` tasks; returns latencies.
async fn run_concurrently<F, Fut>(
    requests: usize,
    concurrency: usize,
    call: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, call) = (Arc::clone(&next), Arc::clone(&call));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let t = Instant::now();
                    call(i as u64).await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok((elapsed, latencies))
}

async fn bench_unary(
    fx: &Arc<Fixtures>,
    server: &Server,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Measurement> {
    let participation = fx.participation().await?;
    let client = IngestServiceClient::new(server.channel().await?);
    let participation_id = participation.id.to_string();
    let generator = Arc::clone(fx);
    let probe = CpuProbe::start(Some(server.pid));
    let (elapsed, latencies) = run_concurrently(requests, concurrency, move |i| {
        let mut client = client.clone();
        let request = proto::RecordSentimentRequest {
            // Retry-safe calls, as a careful client makes them.
            request_id: Uuid::new_v4().to_string(),
            participation_id: participation_id.clone(),
            sentiment: Some(generator.proto_sentiment(i)),
        };
        async move {
            client.record_sentiment(request).await?;
            Ok(())
        }
    })
    .await?;
    let cpu = probe.stop();
    check_stored(fx, &participation, requests as u64).await?;
    Ok(Measurement {
        method: "grpc-unary".into(),
        concurrency,
        rows: requests as u64,
        elapsed,
        latency: Some((percentile(&latencies, 0.5), percentile(&latencies, 0.99))),
        cpu,
    })
}

/// The same single-row INSERT the unary RPC performs, straight through sqlx, with a pool
/// of `concurrency` connections.
async fn bench_sqlx_insert(
    fx: &Arc<Fixtures>,
    options: &PgConnectOptions,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Measurement> {
    let participation = fx.participation().await?;
    let pool = krisp_ingest::app::pool_options(u32::try_from(concurrency)?)
        .min_connections(u32::try_from(concurrency)?)
        .connect_with(options.clone())
        .await?;
    let generator = Arc::clone(fx);
    let (user_id, participation_id) = (participation.user_id, participation.id);
    let task_pool = pool.clone();
    let probe = CpuProbe::start(None);
    let (elapsed, latencies) = run_concurrently(requests, concurrency, move |i| {
        let pool = task_pool.clone();
        let s = generator.sentiment(i);
        async move {
            sqlx::query(
                "INSERT INTO sentiments (id, user_id, participation_id, started_at, ended_at, label, score) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(Uuid::now_v7())
            .bind(user_id)
            .bind(participation_id)
            .bind(s.started_at)
            .bind(s.ended_at)
            .bind(s.label.as_str())
            .bind(s.score)
            .execute(&pool)
            .await?;
            Ok(())
        }
    })
    .await?;
    let cpu = probe.stop();
    pool.close().await;
    check_stored(fx, &participation, requests as u64).await?;
    Ok(Measurement {
        method: "sqlx-insert".into(),
        concurrency,
        rows: requests as u64,
        elapsed,
        latency: Some((percentile(&latencies, 0.5), percentile(&latencies, 0.99))),
        cpu,
    })
}

/// Peak resident memory of a fresh server while it ingests one stream of `rows`.
async fn bench_rss(
    args: &Args,
    fx: &Arc<Fixtures>,
    rows: u64,
) -> anyhow::Result<(u64, u64, u64, Duration)> {
    let server = Server::start(args, 16).await?;
    let idle = rss_kib(server.pid, "VmRSS:");
    let participation = fx.participation().await?;
    let channel = server.channel().await?;
    let pid = server.pid;
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid, "VmRSS:"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    stream_rows(
        Arc::clone(fx),
        channel,
        participation,
        rows,
        args.batch_size,
    )
    .await?;
    let elapsed = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let sampled_peak = sampler.await?;
    let high_water = rss_kib(pid, "VmHWM:");
    server.stop().await?;
    Ok((idle, sampled_peak, high_water, elapsed))
}

/// Empties the feed tables and checkpoints, outside any timing, so that every
/// measurement starts from the same state and no checkpoint lands inside one.
async fn settle(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE sentiments, events, ingest_streams")
        .execute(pool)
        .await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

/// The median round of each (method, concurrency), with the spread of rows/s.
fn medians(runs: Vec<Measurement>) -> Vec<(Measurement, f64, f64)> {
    let mut keys: Vec<(String, usize)> = Vec::new();
    for m in &runs {
        let key = (m.method.clone(), m.concurrency);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut runs: Vec<Option<Measurement>> = runs.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for (method, concurrency) in keys {
        let mut group: Vec<Measurement> = runs
            .iter_mut()
            .filter(|m| {
                m.as_ref()
                    .is_some_and(|m| m.method == method && m.concurrency == concurrency)
            })
            .filter_map(Option::take)
            .collect();
        group.sort_by(|a, b| a.rows_per_second().total_cmp(&b.rows_per_second()));
        let low = group.first().map_or(0.0, Measurement::rows_per_second);
        let high = group.last().map_or(0.0, Measurement::rows_per_second);
        let middle = group.len() / 2;
        if let Some(median) = group.into_iter().nth(middle) {
            out.push((median, low, high));
        }
    }
    out
}

fn chart(results: &[Measurement]) -> String {
    let bars: Vec<(String, f64)> = results
        .iter()
        .map(|m| {
            (
                format!("{} x{}", m.method, m.concurrency),
                m.rows_per_second(),
            )
        })
        .collect();
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let (row_height, left, width) = (26.0, 170.0, 460.0);
    let height = row_height * bars.len() as f64 + 50.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">krisp-ingest: sentiment rows/s by method and concurrency</text>\n"
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 32.0 + i as f64 * row_height;
        let w = value / max * width;
        let color = if label.starts_with("copy") {
            "#888"
        } else if label.starts_with("grpc") {
            "#2a7ae2"
        } else {
            "#e2a72a"
        };
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text>\
             <rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"18\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{}\">{value:.0}</text>",
            left - 6.0,
            y + 13.0,
            left + w + 4.0,
            y + 13.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

async fn run(args: &Args) -> anyhow::Result<()> {
    if args.streams.is_empty() || args.streams.contains(&0) || args.unary_concurrency.contains(&0) {
        bail!("--streams and --unary-concurrency take positive numbers");
    }
    // A fresh benchmark database with the service's migrations.
    let admin = server_options(args, "postgres").await?;
    let mut conn = sqlx::PgConnection::connect_with(&admin).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {BENCH_DATABASE}").as_str())
        .await?;
    conn.close().await?;
    let options = server_options(args, BENCH_DATABASE).await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options.clone())
        .await?;
    storage::migrate(&pool).await?;
    // The benchmark's own database only: autovacuum waking up inside one measurement and
    // not another would be noise. Tables, indexes and constraints stay as migrated.
    let partitioning = partitions::configure(
        &pool,
        &PartitionArgs {
            partman: args.partitions,
            ..PartitionArgs::default()
        },
    )
    .await?;
    eprintln!("krisp-bench: partitions: {partitioning:?}");
    if args.partitions == PartmanMode::Auto && !matches!(partitioning, Partitioning::Partman { .. })
    {
        bail!("--partitions auto needs pg_partman on the server (or pass --partitions off)");
    }
    // Every table that holds rows (the partitions, not their parents).
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.oid::regclass::text FROM pg_class c \
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'",
    )
    .fetch_all(&pool)
    .await?;
    for table in tables {
        sqlx::query(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = off)"
        ))
        .execute(&pool)
        .await?;
    }
    let span_rows = args.rows.max(args.rss_rows).max(args.row_by_row_rows);
    let fx = Arc::new(Fixtures::new(pool.clone(), span_rows).await?);

    eprintln!(
        "krisp-bench: {} rows per load, streams {:?}, unary {:?} x {} requests, {} rounds",
        args.rows, args.streams, args.unary_concurrency, args.unary_requests, args.repeat
    );
    let mut runs: Vec<Measurement> = Vec::new();
    // The service's default pool size.
    let server = Server::start(args, 16).await?;
    // Warm-up, not reported.
    bench_copy(&fx, 10_000, 1).await?;
    bench_grpc_stream(&fx, &server, 10_000, 1, args.batch_size).await?;
    settle(&pool).await?;
    // Rounds interleave the methods, so that drift on the machine hits them alike.
    for round in 1..=args.repeat {
        for &n in &args.streams {
            eprintln!("round {round}: copy x{n}, grpc-stream x{n} ...");
            runs.push(bench_copy(&fx, args.rows, n).await?);
            settle(&pool).await?;
            runs.push(bench_grpc_stream(&fx, &server, args.rows, n, args.batch_size).await?);
            settle(&pool).await?;
        }
        eprintln!("round {round}: row-by-row ...");
        runs.push(bench_row_by_row(&fx, args.row_by_row_rows).await?);
        settle(&pool).await?;
    }
    // Unary: all direct sqlx rounds, then all gRPC rounds, so that the two sides' pools
    // (up to 64 connections each) never hold connections at the same time.
    server.stop().await?;
    for round in 1..=args.repeat {
        for &c in &args.unary_concurrency {
            eprintln!("round {round}: sqlx-insert x{c} ...");
            runs.push(bench_sqlx_insert(&fx, &options, args.unary_requests, c).await?);
            settle(&pool).await?;
        }
    }
    // Each concurrency gets a server whose pool has as many connections as the
    // baseline's, warmed up (connections opened, statements prepared) before timing.
    for &c in &args.unary_concurrency {
        let server = Server::start(args, c).await?;
        bench_unary(&fx, &server, c * 20, c).await?;
        for round in 1..=args.repeat {
            eprintln!("round {round}: grpc-unary x{c} ...");
            runs.push(bench_unary(&fx, &server, args.unary_requests, c).await?);
            settle(&pool).await?;
        }
        server.stop().await?;
    }
    eprintln!(
        "server memory during one stream of {} rows ...",
        args.rss_rows
    );
    let (idle_kib, peak_kib, hwm_kib, rss_elapsed) = bench_rss(args, &fx, args.rss_rows).await?;
    settle(&pool).await?;
    eprintln!("copy with and without the stream keys ...");
    let (copy_without_keys, copy_with_keys) =
        delete_user::bench_stream_keys(&fx, args.rows, args.repeat).await?;
    let delete_times = if args.delete_table_rows > 0 {
        let shape = delete_user::Shape {
            table_rows: args.delete_table_rows,
            streams: args.delete_streams,
            stream_rows: args.delete_stream_rows,
        };
        let server = Server::start(args, 16).await?;
        let times = delete_user::bench_delete(&fx, &server, &shape, args.repeat).await?;
        server.stop().await?;
        times
    } else {
        Vec::new()
    };
    let results = medians(runs);

    // Report.
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| method | concurrency | rows | seconds | rows/s (median of {}) | rows/s range | p50 | p99 | CPU s client | CPU s server | CPU s postgres |",
        args.repeat
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (m, low, high) in &results {
        let (p50, p99) = m.latency.map_or_else(
            || (String::new(), String::new()),
            |(a, b)| {
                (
                    format!("{:.2} ms", a.as_secs_f64() * 1e3),
                    format!("{:.2} ms", b.as_secs_f64() * 1e3),
                )
            },
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.0} | {low:.0}-{high:.0} | {p50} | {p99} | {:.2} | {:.2} | {:.2} |",
            m.method,
            m.concurrency,
            m.rows,
            m.elapsed.as_secs_f64(),
            m.rows_per_second(),
            m.cpu.client,
            m.cpu.server,
            m.cpu.postgres,
        );
    }
    let results: Vec<Measurement> = results.into_iter().map(|(m, _, _)| m).collect();
    let best = |method: &str| {
        results
            .iter()
            .filter(|m| m.method == method)
            .map(Measurement::rows_per_second)
            .fold(0.0, f64::max)
    };
    let at = |method: &str, concurrency: usize| {
        results
            .iter()
            .find(|m| m.method == method && m.concurrency == concurrency)
            .map_or(0.0, Measurement::rows_per_second)
    };
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "server RSS while streaming {} rows in one stream ({:.1} s): idle {:.1} MiB, peak sampled {:.1} MiB, high-water mark {:.1} MiB",
        args.rss_rows,
        rss_elapsed.as_secs_f64(),
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0
    );
    let mut ratio = |what: String, a: f64, b: f64| {
        let _ = writeln!(out, "{what}: {:.2}", a / b.max(1e-9));
    };
    for &n in &args.streams {
        ratio(
            format!("grpc-stream/copy ratio at concurrency {n}"),
            at("grpc-stream", n),
            at("copy", n),
        );
    }
    ratio(
        "grpc-stream/row-by-row ratio".into(),
        best("grpc-stream"),
        best("row-by-row"),
    );
    for &c in &args.unary_concurrency {
        ratio(
            format!("grpc-unary/sqlx-insert ratio at concurrency {c}"),
            at("grpc-unary", c),
            at("sqlx-insert", c),
        );
    }
    ratio(
        format!(
            "copy without / with the stream keys (dropped by migration 0004): {copy_without_keys:.0} / {copy_with_keys:.0} rows/s, ratio"
        ),
        copy_without_keys,
        copy_with_keys,
    );
    if let Some(median) = delete_times.get(delete_times.len() / 2) {
        let rounds: Vec<String> = delete_times
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect();
        let _ = writeln!(
            out,
            "delete-user {}x{} in a {}M-row table: {:.3} s (median of {}; rounds {})",
            args.delete_streams,
            args.delete_stream_rows,
            args.delete_table_rows as f64 / 1e6,
            median.as_secs_f64(),
            delete_times.len(),
            rounds.join(", ")
        );
    }
    // Each side at its best concurrency.
    let _ = writeln!(
        out,
        "stream/copy ratio: {:.2}",
        best("grpc-stream") / best("copy").max(1e-9)
    );
    print!("{out}");

    if let Some(parent) = args.chart.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.chart, chart(&results))?;
    eprintln!("chart written to {}", args.chart.display());
    pool.close().await;
    Ok(())
}
