//! `krisp-bench live`: live feeds at voice-service scale. N feeds (one client stream each,
//! one participation each) over a few HTTP/2 connections to a server process with the
//! default pool; each sends one batch of sentiments a second for a random 20-60 s, then
//! its trailer. They start spread over the ramp, so that all N are open at once at the
//! peak and end at different times, as calls do. Reported: feeds committed and failed
//! by code, rows verified in PostgreSQL, the server's RSS (idle, peak, per open feed),
//! the server's peak database backends, commit latency after the trailer, and the bulk
//! stream/copy ratio measured in the same run.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args as ClapArgs;
use krisp_ingest::{
    domain::Participation,
    proto::{self, ingest_service_client::IngestServiceClient, stream_sentiments_request::Frame},
};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    Args, PROBE_APPLICATION,
    feeds::{Counters, Ended},
    fixtures::{Fixtures, Measurement, settle},
    probes::{CpuProbe, rss_kib},
    report::medians,
    scenarios::{bench_copy, bench_grpc_stream, percentile},
    server::Server,
};

#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct LiveArgs {
    /// Feeds open at once at the peak.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) feeds: usize,
    /// HTTP/2 connections the feeds share.
    #[arg(long, default_value_t = CONNECTIONS)]
    connections: usize,
    /// Sentiments per batch (one batch a second per feed).
    #[arg(long, default_value_t = BATCH)]
    batch: usize,
    /// Shortest and longest feed, in seconds (each picks its length at random).
    #[arg(long, default_value_t = MIN_SECONDS)]
    min_seconds: u64,
    #[arg(long, default_value_t = MAX_SECONDS)]
    max_seconds: u64,
    /// Seconds over which the feeds start (at most --min-seconds, so that all are open
    /// at once).
    #[arg(long, default_value_t = RAMP_SECONDS)]
    ramp_seconds: u64,
    /// Rows of each bulk stream and COPY measured after the feeds (0: skip).
    #[arg(long, default_value_t = 200_000)]
    bulk_rows: u64,
    /// The RPC each feed is: an all-or-nothing client stream (`stream`), or a resumable
    /// LiveFeed whose every batch is acknowledged once committed (`live-feed`).
    #[arg(long, value_enum, default_value_t = Rpc::Stream)]
    pub(crate) rpc: Rpc,
}

const CONNECTIONS: usize = 16;
const BATCH: usize = 5;
const MIN_SECONDS: u64 = 20;
const MAX_SECONDS: u64 = 60;
const RAMP_SECONDS: u64 = 15;

impl LiveArgs {
    /// `feeds` feeds of `rpc` with the defaults of `krisp-bench live`, no bulk part.
    pub(crate) fn feeds(feeds: usize, rpc: Rpc) -> Self {
        Self {
            feeds,
            connections: CONNECTIONS,
            batch: BATCH,
            min_seconds: MIN_SECONDS,
            max_seconds: MAX_SECONDS,
            ramp_seconds: RAMP_SECONDS,
            bulk_rows: 0,
            rpc,
        }
    }

    /// The same feeds, each lasting `min..=max` seconds, started over at most `min`.
    pub(crate) fn lasting(self, min: u64, max: u64) -> Self {
        Self {
            min_seconds: min,
            max_seconds: max,
            ramp_seconds: RAMP_SECONDS.min(min),
            ..self
        }
    }

    /// Items the longest feed sends.
    pub(crate) fn items_per_feed(&self) -> u64 {
        self.max_seconds * self.batch as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Rpc {
    Stream,
    LiveFeed,
}

/// One round's results.
pub(crate) struct Round {
    peak_open: usize,
    committed: usize,
    failures: BTreeMap<String, usize>,
    rows: i64,
    items_committed: u64,
    stream_records: i64,
    idle_kib: u64,
    peak_kib: u64,
    backends: i64,
    /// Sorted.
    latencies: Vec<Duration>,
    elapsed: Duration,
    cpu: crate::probes::Cpu,
}

impl Round {
    fn kib_per_feed(&self) -> f64 {
        self.peak_kib.saturating_sub(self.idle_kib) as f64 / self.peak_open.max(1) as f64
    }
}

pub(crate) async fn run(args: &Args, live: &LiveArgs) -> anyhow::Result<()> {
    let (pool, _) = crate::bench_database(args).await?;
    let fx =
        Arc::new(Fixtures::new(pool.clone(), live.items_per_feed().max(live.bulk_rows)).await?);
    let rounds = measure(args, live, &fx).await?;
    let bulk = if live.bulk_rows > 0 {
        let server = Server::start(args, 16).await?;
        let bulk = bulk_ratio(args, live.rpc, &fx, &server, live.bulk_rows).await?;
        server.stop().await?;
        bulk
    } else {
        Vec::new()
    };
    print!("{}", report(live, &rounds));
    if !bulk.is_empty() {
        let at = |method: &str| {
            bulk.iter()
                .find(|m| m.method == method)
                .map_or(0.0, Measurement::rows_per_second)
        };
        println!(
            "bulk (same run, {} rows, medians of {} rounds): copy {:.0} rows/s, grpc-stream {:.0} rows/s, stream/copy ratio: {:.2}",
            live.bulk_rows,
            args.repeat,
            at("copy"),
            at("grpc-stream"),
            at("grpc-stream") / at("copy").max(1e-9)
        );
        if live.rpc == Rpc::LiveFeed {
            println!(
                "bulk live feed (1,000 items an append): {:.0} rows/s, live-feed/copy ratio: {:.2}, live-feed/grpc-stream ratio: {:.2}",
                at("live-feed"),
                at("live-feed") / at("copy").max(1e-9),
                at("live-feed") / at("grpc-stream").max(1e-9)
            );
        }
    }
    pool.close().await;
    Ok(())
}

/// `--repeat` rounds of `live`'s feeds, each on a settled database.
pub(crate) async fn measure(
    args: &Args,
    live: &LiveArgs,
    fx: &Arc<Fixtures>,
) -> anyhow::Result<Vec<Round>> {
    anyhow::ensure!(
        live.feeds > 0 && live.connections > 0 && live.min_seconds <= live.max_seconds,
        "--feeds and --connections must be positive, --min-seconds at most --max-seconds"
    );
    let mut rounds = Vec::new();
    for number in 1..=args.repeat {
        eprintln!("live ({:?}): round {number} of {}", live.rpc, args.repeat);
        settle(&fx.pool).await?;
        rounds.push(round(args, live, fx).await?);
    }
    settle(&fx.pool).await?;
    Ok(rounds)
}

/// The latency percentiles of `rounds` (p50, p90, p99, p99.9, max), each the median of
/// the rounds', in milliseconds.
pub(crate) fn latency_percentiles(rounds: &[Round]) -> Vec<(&'static str, f64)> {
    let median = |value: &dyn Fn(&Round) -> Duration| {
        let mut values: Vec<f64> = rounds
            .iter()
            .map(|r| value(r).as_secs_f64() * 1e3)
            .collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or_default()
    };
    let mut out: Vec<(&'static str, f64)> =
        [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)]
            .into_iter()
            .map(|(name, p)| (name, median(&|r| percentile(&r.latencies, p))))
            .collect();
    out.push((
        "max",
        median(&|r| r.latencies.last().copied().unwrap_or_default()),
    ));
    out
}

/// One round: a new server (the service's defaults, its 16 connections included), new
/// participations, every feed to its end.
async fn round(args: &Args, live: &LiveArgs, fx: &Arc<Fixtures>) -> anyhow::Result<Round> {
    let participations = fx.participations(live.feeds).await?;
    let server = Server::start(args, 16).await?;
    let mut channels = Vec::new();
    for _ in 0..live.connections {
        channels.push(server.channel().await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kib = rss_kib(server.pid, "VmRSS:");

    let counters = Arc::new(Counters::default());
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(
        fx.pool.clone(),
        server.pid,
        Arc::clone(&counters),
        Arc::clone(&done),
    ));
    eprintln!(
        "live: {} feeds over {} connections, {} sentiments/s each for {}-{} s, started over {} s ...",
        live.feeds,
        live.connections,
        live.batch,
        live.min_seconds,
        live.max_seconds,
        live.ramp_seconds
    );
    let probe = CpuProbe::start(Some(server.pid));
    let started = Instant::now();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let ramp = Duration::from_secs(live.ramp_seconds.min(live.min_seconds));
    let tasks: Vec<_> = participations
        .into_iter()
        .enumerate()
        .map(|(i, participation)| {
            let starts_after = ramp.mul_f64(i as f64 / live.feeds as f64);
            let seconds = live.min_seconds + random.below(live.max_seconds - live.min_seconds + 1);
            let channel = channels[i % channels.len()].clone();
            let (fx, counters) = (Arc::clone(fx), Arc::clone(&counters));
            match live.rpc {
                Rpc::Stream => tokio::spawn(feed(
                    fx,
                    channel,
                    participation,
                    starts_after,
                    seconds,
                    live.batch,
                    counters,
                )),
                Rpc::LiveFeed => tokio::spawn(crate::live_feed::feed(
                    fx,
                    channel,
                    participation,
                    starts_after,
                    seconds,
                    live.batch,
                    counters,
                )),
            }
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut items_committed = 0;
    let mut committed = 0;
    for task in tasks {
        match task.await? {
            Ended::Committed {
                items,
                latencies: measured,
            } => {
                items_committed += items;
                committed += 1;
                latencies.extend(measured);
            }
            Ended::Failed(code) => *failures.entry(code).or_default() += 1,
        }
    }
    let elapsed = started.elapsed();
    let cpu = probe.stop();
    done.store(true, Ordering::Relaxed);
    let peaks = sampler.await?;
    server.stop().await?;
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(&fx.pool);
    latencies.sort();
    Ok(Round {
        peak_open: counters.peak_open.load(Ordering::Relaxed),
        committed,
        failures,
        rows: count("SELECT count(*) FROM sentiments").await?,
        items_committed,
        stream_records: match live.rpc {
            Rpc::Stream => count("SELECT count(*) FROM ingest_streams").await?,
            Rpc::LiveFeed => {
                count("SELECT count(*) FROM live_feeds WHERE closed_at IS NOT NULL").await?
            }
        },
        idle_kib,
        peak_kib: peaks.rss_kib,
        backends: peaks.backends,
        latencies,
        elapsed,
        cpu,
    })
}

/// The rounds side by side, with the median of each number.
pub(crate) fn report(live: &LiveArgs, rounds: &[Round]) -> String {
    let mut out = String::new();
    let header: Vec<String> = (1..=rounds.len()).map(|r| format!("round {r}")).collect();
    let _ = writeln!(
        out,
        "| {} feeds | {} | median |",
        live.feeds,
        header.join(" | ")
    );
    let _ = writeln!(out, "| --- |{} ---: |", " ---: |".repeat(rounds.len()));
    let mut row = |what: &str, value: &dyn Fn(&Round) -> f64, show: &dyn Fn(f64) -> String| {
        let mut values: Vec<f64> = rounds.iter().map(value).collect();
        let cells: Vec<String> = values.iter().map(|v| show(*v)).collect();
        values.sort_by(f64::total_cmp);
        let median = values.get(values.len() / 2).copied().unwrap_or_default();
        let _ = writeln!(out, "| {what} | {} | {} |", cells.join(" | "), show(median));
    };
    let count = |v: f64| format!("{v:.0}");
    let ms = |v: f64| format!("{v:.1} ms");
    let mib = |v: f64| format!("{:.1} MiB", v / 1024.0);
    let millis = |d: Duration| d.as_secs_f64() * 1e3;
    row("feeds open at once (peak)", &|r| r.peak_open as f64, &count);
    row("committed", &|r| r.committed as f64, &count);
    row(
        "failed",
        &|r| r.failures.values().sum::<usize>() as f64,
        &count,
    );
    row("rows in PostgreSQL", &|r| r.rows as f64, &count);
    row(
        "items committed (receipts)",
        &|r| r.items_committed as f64,
        &count,
    );
    let (records, latency) = match live.rpc {
        Rpc::Stream => ("stream records", "commit latency after the trailer"),
        Rpc::LiveFeed => ("feeds closed", "ack latency after each batch"),
    };
    row(records, &|r| r.stream_records as f64, &count);
    row("server RSS idle", &|r| r.idle_kib as f64, &mib);
    row("server RSS peak", &|r| r.peak_kib as f64, &mib);
    row(
        "server RSS per open feed, KiB ((peak - idle) / peak open)",
        &Round::kib_per_feed,
        &|v| format!("{v:.1}"),
    );
    use krisp_ingest::storage::{FEED_CONNECTIONS, OWN_CONNECTIONS, UNARY_CONNECTIONS};
    row(
        &format!(
            "server's database backends, peak (of 16: pool {}, health probe 1, live feeds \
             {FEED_CONNECTIONS}, unary writers {UNARY_CONNECTIONS})",
            16 - OWN_CONNECTIONS
        ),
        &|r| r.backends as f64,
        &count,
    );
    for (name, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
        row(
            &format!("{latency}, {name}"),
            &|r| millis(percentile(&r.latencies, p)),
            &ms,
        );
    }
    row(
        &format!("{latency}, max"),
        &|r| millis(r.latencies.last().copied().unwrap_or_default()),
        &ms,
    );
    row("run, s", &|r| r.elapsed.as_secs_f64(), &|v| {
        format!("{v:.1}")
    });
    row("CPU s client", &|r| r.cpu.client, &|v| format!("{v:.1}"));
    row("CPU s server", &|r| r.cpu.server, &|v| format!("{v:.1}"));
    row("CPU s postgres", &|r| r.cpu.postgres, &|v| {
        format!("{v:.1}")
    });
    for (i, r) in rounds.iter().enumerate() {
        if !r.failures.is_empty() {
            let _ = writeln!(out, "round {}: failed by code: {:?}", i + 1, r.failures);
        }
    }
    out
}

/// One feed: header, one batch a second for `seconds`, trailer; the commit latency is
/// from the trailer to the receipt.
async fn feed(
    fx: Arc<Fixtures>,
    channel: Channel,
    participation: Participation,
    starts_after: Duration,
    seconds: u64,
    batch: usize,
    counters: Arc<Counters>,
) -> Ended {
    tokio::time::sleep(starts_after).await;
    let (tx, rx) = mpsc::channel(4);
    let mut client = IngestServiceClient::new(channel);
    let call = tokio::spawn(async move { client.stream_sentiments(ReceiverStream::new(rx)).await });
    let message = |frame| proto::StreamSentimentsRequest { frame: Some(frame) };
    counters.opened();
    let sent = async {
        tx.send(message(Frame::Header(proto::StreamHeader {
            stream_id: Uuid::new_v4().to_string(),
            participation_id: participation.id.to_string(),
        })))
        .await?;
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let mut items = 0;
        for _ in 0..seconds {
            ticks.tick().await;
            let sentiments = (items..items + batch as u64)
                .map(|i| fx.proto_sentiment(i))
                .collect();
            tx.send(message(Frame::Batch(proto::SentimentBatch { sentiments })))
                .await?;
            items += batch as u64;
        }
        tx.send(message(Frame::Trailer(proto::StreamTrailer {
            item_count: items,
        })))
        .await?;
        Ok::<_, mpsc::error::SendError<proto::StreamSentimentsRequest>>(items)
    }
    .await;
    let trailer_sent = Instant::now();
    drop(tx);
    let answer = call.await;
    let latency = trailer_sent.elapsed();
    counters.open.fetch_sub(1, Ordering::Relaxed);
    match (sent, answer) {
        (_, Ok(Err(status))) => Ended::Failed(format!("{:?}", status.code())),
        (Ok(items), Ok(Ok(response))) => match response.into_inner().receipt {
            Some(receipt) if receipt.items_stored == items => Ended::Committed {
                items,
                latencies: vec![latency],
            },
            other => Ended::Failed(format!("wrong receipt {other:?}")),
        },
        (Err(_), Ok(Ok(_))) => Ended::Failed("answered before the trailer".into()),
        (_, Err(join)) => Ended::Failed(format!("client task: {join}")),
    }
}

/// Peaks seen by [`sample`].
struct Peaks {
    rss_kib: u64,
    backends: i64,
}

/// Samples the server's RSS and its database backends until `done`.
async fn sample(pool: PgPool, pid: u32, counters: Arc<Counters>, done: Arc<AtomicBool>) -> Peaks {
    let mut peaks = Peaks {
        rss_kib: 0,
        backends: 0,
    };
    let mut last_report = Instant::now();
    let mut last_cpu = CpuProbe::start(Some(pid));
    while !done.load(Ordering::Relaxed) {
        peaks.rss_kib = peaks.rss_kib.max(rss_kib(pid, "VmRSS:"));
        let backends: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND backend_type = 'client backend' AND application_name <> $1",
        )
        .bind(PROBE_APPLICATION)
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        peaks.backends = peaks.backends.max(backends);
        if last_report.elapsed() >= Duration::from_secs(5) {
            let cpu = last_cpu.stop();
            let seconds = last_report.elapsed().as_secs_f64();
            eprintln!(
                "live: {} feeds open, server RSS {}, backends {backends}, CPU % client {:.0} server {:.0} postgres {:.0}",
                counters.open.load(Ordering::Relaxed),
                mib(rss_kib(pid, "VmRSS:")),
                100.0 * cpu.client / seconds,
                100.0 * cpu.server / seconds,
                100.0 * cpu.postgres / seconds,
            );
            last_report = Instant::now();
            last_cpu = CpuProbe::start(Some(pid));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    peaks
}

/// Bulk grpc-stream and copy (and with `Rpc::LiveFeed` one live feed appending as fast
/// as it can), alternating, one each, `--repeat` rounds; medians.
async fn bulk_ratio(
    args: &Args,
    rpc: Rpc,
    fx: &Arc<Fixtures>,
    server: &Server,
    rows: u64,
) -> anyhow::Result<Vec<Measurement>> {
    let mut runs = Vec::new();
    bench_copy(fx, 10_000, 1).await?;
    bench_grpc_stream(fx, server, 10_000, 1, 1000).await?;
    settle(&fx.pool).await?;
    for round in 1..=args.repeat {
        eprintln!("round {round}: bulk copy, grpc-stream ...");
        runs.push(bench_copy(fx, rows, 1).await?);
        settle(&fx.pool).await?;
        runs.push(bench_grpc_stream(fx, server, rows, 1, 1000).await?);
        settle(&fx.pool).await?;
        if rpc == Rpc::LiveFeed {
            runs.push(crate::live_feed::bulk(fx, server, rows, 1000).await?);
            settle(&fx.pool).await?;
        }
    }
    Ok(medians(runs).into_iter().map(|(m, _, _)| m).collect())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A small deterministic generator (xorshift64*), so that runs are alike.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}
