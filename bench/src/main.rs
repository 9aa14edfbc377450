//! Side-by-side ingestion benchmark: on one PostgreSQL and one schema, in one run, it
//! loads the same sentiment rows with
//! 1. `copy`: binary `COPY ... FROM STDIN` straight into the tables (the limit),
//! 2. `row-by-row`: one INSERT per row in one transaction (the original pipeline),
//! 3. `grpc-stream`: krisp-ingest end to end, tonic clients streaming over loopback,
//!    and `live-feed`: one LiveFeed appending as fast as its acknowledgements allow,
//! 4. unary calls ([`unary`]): RecordSentiment (`grpc-unary`), GetUser, JoinSession and
//!    the timeline's first entry, each against its direct-SQL equivalent through sqlx at
//!    the same concurrency, and the floor of a unary call (the server's health Check),
//!
//! and reports rows (calls)/s, latencies, CPU time per process, and the server's peak RSS during
//! one long stream; then `delete-user` ([`delete_user`]): DeleteUser in a large table,
//! and what the schema that makes it fast costs stream ingest; then thousands of live
//! feeds of both kinds at once ([`live`]). It prints the report in Markdown and writes
//! two charts ([`report`]): throughput by concurrency, and the live feeds' latency
//! percentiles.
//!
//! Modules: [`server`] (the server under test), [`probes`] (CPU and memory from /proc),
//! [`fixtures`] (data), [`scenarios`] (the bulk measurements), [`unary`], [`delete_user`],
//! [`live`] with its clients ([`feeds`], [`live_feed`]), [`report`].
//!
//! The server runs as a child process (this binary, `serve` subcommand), so its memory
//! and CPU are measured on their own.

mod delete_user;
mod feeds;
mod fixtures;
mod helpers;
mod live;
mod live_feed;
mod probes;
mod reads;
mod report;
mod scenarios;
mod server;
mod traces;
mod unary;

/// mimalloc rather than the system allocator: with thousands of open streams, glibc's
/// malloc fragmented (RSS stayed at its peak after the streams ended) and showed in the
/// server's CPU profile (docs/decisions/0010-mimalloc.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{path::PathBuf, sync::Arc};

use anyhow::bail;
use clap::{Parser, Subcommand};
use krisp_ingest::{
    app::Application,
    local_postgres::{self, LocalPostgres},
    partitions::{self, PartitionArgs, Partitioning, PartmanMode},
    storage,
};
use sqlx::{
    Connection, Executor, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use fixtures::{Fixtures, Measurement, settle};
use report::medians;
use scenarios::{bench_copy, bench_grpc_stream, bench_row_by_row, bench_rss};
use server::Server;

const BENCH_DATABASE: &str = "krisp_bench";
/// The application_name of the benchmark's own connections (not the server's).
const PROBE_APPLICATION: &str = "krisp-bench";

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
    /// Calls per measurement of each unary RPC and its direct-SQL equivalent.
    #[arg(long, default_value_t = 4000)]
    unary_requests: usize,
    /// Concurrency levels of the unary calls and their direct-SQL equivalents.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    unary_concurrency: Vec<usize>,
    /// The unary RPCs measured, each against its direct-SQL equivalent.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "record,record-new-id,get-user,join-session,timeline"
    )]
    unary_cases: Vec<unary::Case>,
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
    /// Daily partitions of sentiments and events to add for days long past (empty), as a
    /// service accumulates them without a retention: a year of them is 365.
    #[arg(long, default_value_t = 0)]
    old_partitions: u32,
    /// delete-user: rows of other users in the table (0: skip the scenario).
    #[arg(long, default_value_t = 4_000_000)]
    delete_table_rows: u64,
    /// delete-user: streams of the deleted user.
    #[arg(long, default_value_t = 400)]
    delete_streams: u64,
    /// delete-user: rows per stream of the deleted user.
    #[arg(long, default_value_t = 500)]
    delete_stream_rows: u64,
    /// Entries of the participation whose timeline is read (0: skip the reads).
    #[arg(long, default_value_t = 1_000_000)]
    read_entries: u64,
    /// Live feeds of each kind (client streams, LiveFeeds) open at once at the peak, as
    /// `krisp-bench live --feeds N` measures them (0: skip).
    #[arg(long, default_value_t = 10_000)]
    live_feeds: usize,
    /// Shortest and longest of those feeds, in seconds (as `live --min-seconds
    /// --max-seconds`).
    #[arg(long, default_value_t = 20)]
    live_min_seconds: u64,
    #[arg(long, default_value_t = 60)]
    live_max_seconds: u64,
    /// Where to write the chart (SVG) of throughput by concurrency.
    #[arg(long, default_value = "docs/benchmarks.svg")]
    chart: PathBuf,
    /// Where to write the chart (SVG) of the live feeds' latency percentiles.
    #[arg(long, default_value = "docs/benchmarks-live.svg")]
    live_chart: PathBuf,
    /// The server under test serves its Prometheus metrics (on a port of its own, as the
    /// service does by default) and so records them.
    #[arg(long, global = true)]
    server_metrics: bool,
    /// The server under test exports traces over OTLP to a sink in this process (the
    /// number of spans it received is reported).
    #[arg(long, global = true)]
    traces: bool,
    /// With --traces: the share of calls the server traces.
    #[arg(long, global = true, default_value_t = 1.0)]
    trace_sample_ratio: f64,
    /// (internal) Where the server under test exports its traces.
    #[arg(long, global = true, hide = true)]
    otlp_endpoint: Option<String>,
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
    /// Live feeds at voice-service scale (docs/BENCHMARKS.md, "Live feeds"): many
    /// long client streams at once, each sending a small batch a second.
    Live(live::LiveArgs),
    /// The client libraries' live-feed helpers (docs/BENCHMARKS.md, "Live-feed
    /// helpers"): one feed through each, pipelined and with one append in flight.
    Helpers(helpers::HelperArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    // Only the benchmark itself, never its `serve` child, runs the sink.
    let sink = match (&args.command, args.traces) {
        (Some(Command::Serve { .. }), _) | (_, false) => None,
        (_, true) => {
            let sink = traces::Sink::start().await?;
            args.otlp_endpoint = Some(sink.endpoint.clone());
            Some(sink)
        }
    };
    let outcome = match &args.command {
        Some(Command::Serve { max_connections }) => serve(&args, *max_connections).await,
        Some(Command::Live(live)) => live::run(&args, live).await,
        Some(Command::Helpers(helpers)) => helpers::run(&args, helpers).await,
        None => run(&args).await,
    };
    if let Some(sink) = sink {
        println!(
            "traces: on, {} spans received by the benchmark's OTLP sink",
            sink.spans()
        );
    }
    outcome
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
    let otlp = args
        .otlp_endpoint
        .clone()
        .map(|endpoint| krisp_ingest::telemetry::Otlp {
            endpoint,
            sample_ratio: args.trace_sample_ratio,
        });
    let telemetry =
        krisp_ingest::telemetry::init(krisp_ingest::config::LogFormat::Text, otlp.as_ref())?;
    let pool = krisp_ingest::app::pool_options(max_connections)
        .connect_with(server_options(args, BENCH_DATABASE).await?)
        .await?;
    let settings = krisp_ingest::app::Settings {
        metrics: args
            .server_metrics
            .then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        ..krisp_ingest::app::Settings::default()
    };
    let app = Application::build(settings, pool).await?;
    println!("listening on {}", app.local_addr());
    let served = app
        .run_until_stopped(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    // The spans still buffered go to the sink before the process ends.
    telemetry.shutdown();
    served
}

/// What the run measures on: `auto` without pg_partman goes on with the default
/// partitions, as the service does, and says so (the numbers are then not those of a
/// partitioned deployment).
fn partitions_note(requested: PartmanMode, found: &Partitioning) -> String {
    match found {
        Partitioning::Partman { intervals, .. } => format!("partitions: pg_partman, {intervals:?}"),
        Partitioning::DefaultOnly { reason } if requested == PartmanMode::Auto => format!(
            "partitions: pg_partman is not available ({reason}); measuring with the default \
             partitions only, as --partitions off would. Install pg_partman (Debian: \
             postgresql-<version>-partman) to measure time partitions"
        ),
        Partitioning::DefaultOnly { .. } => {
            "partitions: the default partitions only (--partitions off)".to_owned()
        }
    }
}

/// A fresh benchmark database with the service's migrations and partitions, autovacuum
/// off on its tables; a pool of the benchmark's own (application_name `krisp-bench`).
async fn bench_database(args: &Args) -> anyhow::Result<(PgPool, PgConnectOptions)> {
    // A fresh benchmark database with the service's migrations.
    let admin = server_options(args, "postgres").await?;
    let mut conn = sqlx::PgConnection::connect_with(&admin).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {BENCH_DATABASE}").as_str())
        .await?;
    conn.close().await?;
    let options = server_options(args, BENCH_DATABASE)
        .await?
        .application_name(PROBE_APPLICATION);
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
    eprintln!(
        "krisp-bench: {}",
        partitions_note(args.partitions, &partitioning)
    );
    add_old_partitions(&pool, args.old_partitions).await?;
    // Every table that holds rows (the partitions, not their parents).
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.oid::regclass::text FROM pg_class c \
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'",
    )
    .fetch_all(&pool)
    .await?;
    // Not live_feeds: every live-feed append updates its feed's row, and a table that
    // small and that hot is vacuumed all the time in any real deployment.
    for table in tables.iter().filter(|t| *t != "live_feeds") {
        sqlx::query(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = off)"
        ))
        .execute(&pool)
        .await?;
    }
    Ok((pool, options))
}

/// `days` empty daily partitions of sentiments and events, from 2020-01-01 on: days no
/// row of the benchmark falls on.
async fn add_old_partitions(pool: &PgPool, days: u32) -> anyhow::Result<()> {
    for table in ["sentiments", "events"] {
        for day in 0..days {
            sqlx::query(&format!(
                "CREATE TABLE {table}_old_{day} PARTITION OF {table} FOR VALUES \
                 FROM ('2020-01-01'::timestamptz + interval '{day} days') \
                 TO ('2020-01-01'::timestamptz + interval '{next} days')",
                next = day + 1
            ))
            .execute(pool)
            .await?;
        }
    }
    if days > 0 {
        eprintln!("krisp-bench: {days} old daily partitions added to sentiments and events");
    }
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<()> {
    if args.streams.is_empty() || args.streams.contains(&0) || args.unary_concurrency.contains(&0) {
        bail!("--streams and --unary-concurrency take positive numbers");
    }
    let (pool, options) = bench_database(args).await?;
    let span_rows = args
        .rows
        .max(args.rss_rows)
        .max(args.row_by_row_rows)
        .max(args.read_entries)
        .max(
            live::LiveArgs::feeds(1, live::Rpc::Stream)
                .lasting(args.live_min_seconds, args.live_max_seconds)
                .items_per_feed(),
        );
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
        eprintln!(
            "round {round}: one LiveFeed, {} items an append ...",
            args.batch_size
        );
        runs.push(live_feed::bulk(&fx, &server, args.rows, args.batch_size as u64).await?);
        settle(&pool).await?;
        eprintln!("round {round}: row-by-row ...");
        runs.push(bench_row_by_row(&fx, args.row_by_row_rows).await?);
        settle(&pool).await?;
    }
    server.stop().await?;
    runs.extend(unary::run(args, &fx, &options).await?);
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
    let mut range_entries = 0;
    if args.read_entries > 0 {
        let (reads, entries) = reads::run(args, &fx, args.read_entries).await?;
        runs.extend(reads);
        range_entries = entries;
    }
    let mut live = Vec::new();
    if args.live_feeds > 0 {
        for rpc in [live::Rpc::Stream, live::Rpc::LiveFeed] {
            let shape = live::LiveArgs::feeds(args.live_feeds, rpc)
                .lasting(args.live_min_seconds, args.live_max_seconds);
            let rounds = live::measure(args, &shape, &fx).await?;
            live.push((shape, rounds));
        }
    }
    let run = report::Run {
        results: medians(runs),
        rss: report::Rss {
            rows: args.rss_rows,
            elapsed: rss_elapsed,
            idle_kib,
            peak_kib,
            hwm_kib,
        },
        stream_keys: (copy_without_keys, copy_with_keys),
        delete_times,
        range_entries,
        live,
    };
    print!("{}", report::markdown(args, &run));
    for (path, svg) in [
        (&args.chart, report::throughput_chart(&run)),
        (&args.live_chart, report::latency_chart(&run)),
    ] {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, svg)?;
        eprintln!("chart written to {}", path.display());
    }
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_partitions_without_pg_partman_fall_back_and_say_so() {
        let missing = Partitioning::DefaultOnly {
            reason: "pg_partman is not installed on the server".into(),
        };
        let note = partitions_note(PartmanMode::Auto, &missing);
        assert!(note.contains("pg_partman is not available"), "{note}");
        assert!(note.contains("not installed on the server"), "{note}");
        assert!(note.contains("default partitions only"), "{note}");
        let off = partitions_note(PartmanMode::Off, &missing);
        assert!(
            off.contains("--partitions off") && !off.contains("not available"),
            "{off}"
        );
        let partman = Partitioning::Partman {
            schema: "partman".into(),
            intervals: vec![("public.sentiments".into(), "1 day".into())],
            retention: None,
            worker: false,
        };
        assert!(partitions_note(PartmanMode::Auto, &partman).contains("pg_partman"));
    }
}
