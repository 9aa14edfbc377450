//! Timeline reads: the whole timeline of one participation of many entries, read through
//! GetTimeline by a Rust client (`grpc-read`) and by the Python client (`python-read`,
//! grpcio), against `COPY (SELECT ... ORDER BY ...) TO STDOUT` of the same rows
//! (`copy-to`); and a five-minute range of it (`grpc-range`) against the service's own
//! statement for that range through sqlx (`sqlx-range`).

use std::{
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chrono::TimeDelta;
use futures_util::TryStreamExt;
use krisp_ingest::{
    domain::{Participation, TimelineRange},
    proto::{self, ingest_service_client::IngestServiceClient, to_timestamp},
    storage,
};
use sqlx::Connection;

use crate::{
    Args,
    fixtures::{Fixtures, Measurement, settle},
    probes::CpuProbe,
    scenarios::{copy_rows, percentile},
    server::Server,
};

/// Calls of the range read per round, one at a time.
const RANGE_CALLS: usize = 50;
/// The range read's length.
const RANGE: TimeDelta = TimeDelta::minutes(5);

/// The reads of `entries` sentiments of one participation, `--repeat` rounds
/// interleaved; every read checks that it got every entry.
/// Returns the measurements and the entries of the range.
pub(crate) async fn run(
    args: &Args,
    fx: &Arc<Fixtures>,
    entries: u64,
) -> anyhow::Result<(Vec<Measurement>, u64)> {
    settle(&fx.pool).await?;
    let participation = fx.participation().await?;
    eprintln!("reads: loading {entries} sentiments into one participation ...");
    copy_rows(Arc::clone(fx), participation.clone(), entries).await?;
    sqlx::query("ANALYZE sentiments").execute(&fx.pool).await?;
    let server = Server::start(args, 16).await?;
    let python = python_reader();
    if let Err(why) = &python {
        eprintln!("reads: python-read skipped: {why}");
    }
    // The range: five minutes in the middle of the timeline.
    let middle = participation.connected_at + TimeDelta::milliseconds(i64::try_from(entries)? * 50);
    let range =
        TimelineRange::between(Some(middle), Some(middle + RANGE)).map_err(anyhow::Error::msg)?;
    let range_entries = {
        let mut client = IngestServiceClient::new(server.channel().await?);
        read_all(&mut client, request(&participation, Some(&range))).await?
    };
    let mut runs = Vec::new();
    for round in 1..=args.repeat {
        eprintln!("round {round}: copy-to, grpc-read, python-read, grpc-range, sqlx-range ...");
        runs.push(copy_to(fx, &participation, entries).await?);
        runs.push(grpc_read(&server, &participation, entries).await?);
        if let Ok(script) = &python {
            runs.push(python_read(script, &server, &participation, entries).await?);
        }
        runs.push(grpc_range(&server, &participation, &range).await?);
        runs.push(sqlx_range(fx, &participation, &range).await?);
    }
    server.stop().await?;
    Ok((runs, range_entries))
}

/// `copy-to`: the rows of the timeline as PostgreSQL's COPY sends them, in timeline
/// order, read to the end by sqlx.
async fn copy_to(
    fx: &Fixtures,
    participation: &Participation,
    entries: u64,
) -> anyhow::Result<Measurement> {
    // The service's own statement with its values written in, in PostgreSQL's text.
    let sql = storage::timeline_literal_sql(
        participation.user_id,
        participation.id,
        participation.connected_at,
        &TimelineRange::all(),
    );
    let mut conn = fx.pool.acquire().await?;
    let probe = CpuProbe::start(None);
    let started = Instant::now();
    let mut lines = 0u64;
    let mut out = conn
        .copy_out_raw(&format!("COPY ({sql}) TO STDOUT"))
        .await?;
    while let Some(chunk) = out.try_next().await? {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(lines == entries, "copy-to read {lines} of {entries} rows");
    Ok(Measurement {
        method: "copy-to".into(),
        concurrency: 1,
        rows: entries,
        elapsed,
        latency: None,
        cpu: probe.stop(),
    })
}

fn request(
    participation: &Participation,
    range: Option<&TimelineRange>,
) -> proto::GetTimelineRequest {
    proto::GetTimelineRequest {
        participation_id: participation.id.to_string(),
        start_time: range.and_then(TimelineRange::from).map(to_timestamp),
        end_time: range.and_then(TimelineRange::until).map(to_timestamp),
        after: None,
        chunked: true,
    }
}

/// Reads `request` to its end through `client`; the entries.
async fn read_all(
    client: &mut IngestServiceClient<tonic::transport::Channel>,
    request: proto::GetTimelineRequest,
) -> anyhow::Result<u64> {
    let mut stream = client.get_timeline(request).await?.into_inner();
    let mut entries = 0;
    while let Some(message) = stream.message().await? {
        entries += message.entries.len() as u64;
    }
    Ok(entries)
}

/// `grpc-read`: the whole timeline, chunked, by a tonic client.
async fn grpc_read(
    server: &Server,
    participation: &Participation,
    entries: u64,
) -> anyhow::Result<Measurement> {
    let mut client =
        IngestServiceClient::new(server.channel().await?).max_decoding_message_size(8 << 20);
    let probe = CpuProbe::start(Some(server.pid));
    let started = Instant::now();
    let read = read_all(&mut client, request(participation, None)).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        read == entries,
        "grpc-read read {read} of {entries} entries"
    );
    Ok(Measurement {
        method: "grpc-read".into(),
        concurrency: 1,
        rows: entries,
        elapsed,
        latency: None,
        cpu: probe.stop(),
    })
}

/// The Python reader beside this crate, when python3 with grpcio and grpcio-tools can run
/// it.
fn python_reader() -> anyhow::Result<std::path::PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("timeline_read.py");
    let check = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .context("python3 is not installed")?;
    if !check.status.success() {
        bail!(
            "python3 lacks grpcio or grpcio-tools (pip install -r clients/python/requirements.txt)"
        );
    }
    Ok(script)
}

/// `python-read`: the whole timeline, chunked, by grpcio in a Python process; the time is
/// the script's own, from its call to its last entry (not the interpreter's start).
async fn python_read(
    script: &Path,
    server: &Server,
    participation: &Participation,
    entries: u64,
) -> anyhow::Result<Measurement> {
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut python = tokio::process::Command::new("python3");
    python
        .arg(script)
        .arg(&proto_dir)
        .arg(server.address.to_string())
        .arg(participation.id.to_string());
    let (read, elapsed) = count_and_seconds("python-read", &mut python).await?;
    anyhow::ensure!(
        read == entries,
        "python-read read {read} of {entries} entries"
    );
    Ok(Measurement {
        method: "python-read".into(),
        concurrency: 1,
        rows: entries,
        elapsed,
        latency: None,
        cpu: crate::probes::Cpu::default(),
    })
}

/// `grpc-range`: [`RANGE_CALLS`] reads of the range, one at a time.
async fn grpc_range(
    server: &Server,
    participation: &Participation,
    range: &TimelineRange,
) -> anyhow::Result<Measurement> {
    let mut client = IngestServiceClient::new(server.channel().await?);
    let expected = read_all(&mut client, request(participation, Some(range))).await?;
    let probe = CpuProbe::start(Some(server.pid));
    timed_calls("grpc-range", expected, probe, || {
        let mut client = client.clone();
        let request = request(participation, Some(range));
        async move { read_all(&mut client, request).await }
    })
    .await
}

/// `sqlx-range`: the service's statement for the range, run by sqlx the same way (not
/// prepared), every row fetched.
async fn sqlx_range(
    fx: &Fixtures,
    participation: &Participation,
    range: &TimelineRange,
) -> anyhow::Result<Measurement> {
    let sql = storage::timeline_sql(range);
    let lower = storage::timeline_lower_bound(participation, range);
    let until = range.until().context("a range with an end")?;
    let mut conn = sqlx::PgConnection::connect_with(&fx.pool.connect_options()).await?;
    let mut read = async || -> anyhow::Result<u64> {
        let rows = sqlx::query(&sql)
            .bind(participation.user_id)
            .bind(participation.id)
            .bind(lower)
            .bind(until)
            .persistent(false)
            .fetch_all(&mut conn)
            .await?;
        Ok(rows.len() as u64)
    };
    let expected = read().await?;
    let probe = CpuProbe::start(None);
    let mut latencies = Vec::with_capacity(RANGE_CALLS);
    let started = Instant::now();
    for _ in 0..RANGE_CALLS {
        let call = Instant::now();
        anyhow::ensure!(
            read().await? == expected,
            "sqlx-range read a different count"
        );
        latencies.push(call.elapsed());
    }
    measured("sqlx-range", started.elapsed(), latencies, probe)
}

/// [`RANGE_CALLS`] calls of `call`, one at a time, each of which must read `expected`.
async fn timed_calls<F, Fut>(
    method: &str,
    expected: u64,
    probe: CpuProbe,
    call: F,
) -> anyhow::Result<Measurement>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<u64>>,
{
    let mut latencies = Vec::with_capacity(RANGE_CALLS);
    let started = Instant::now();
    for _ in 0..RANGE_CALLS {
        let at = Instant::now();
        anyhow::ensure!(call().await? == expected, "{method} read a different count");
        latencies.push(at.elapsed());
    }
    measured(method, started.elapsed(), latencies, probe)
}

/// A measurement of range reads: `rows` is the calls made.
fn measured(
    method: &str,
    elapsed: Duration,
    mut latencies: Vec<Duration>,
    probe: CpuProbe,
) -> anyhow::Result<Measurement> {
    latencies.sort();
    Ok(Measurement {
        method: method.into(),
        concurrency: 1,
        rows: RANGE_CALLS as u64,
        elapsed,
        latency: Some((percentile(&latencies, 0.5), percentile(&latencies, 0.99))),
        cpu: probe.stop(),
    })
}

/// Runs a driver script that prints `<count> <seconds>` (its own timing, not the
/// interpreter's start); `name` names it in errors.
pub(crate) async fn count_and_seconds(
    name: &str,
    command: &mut tokio::process::Command,
) -> anyhow::Result<(u64, Duration)> {
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "{name} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut fields = stdout.split_whitespace();
    let (Some(count), Some(seconds)) = (fields.next(), fields.next()) else {
        bail!("{name} printed {stdout:?}");
    };
    Ok((count.parse()?, Duration::from_secs_f64(seconds.parse()?)))
}
