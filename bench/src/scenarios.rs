//! The measurements of bulk loads: copy, row-by-row, grpc-stream, and the server's memory
//! during one long stream (unary calls: [`crate::unary`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::stream;
use krisp_ingest::{
    domain::{self, NewSentiment, Participation, StreamHeader},
    proto::{self, ingest_service_client::IngestServiceClient, stream_sentiments_request::Frame},
};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    Args,
    fixtures::{Fixtures, Measurement},
    probes::{CpuProbe, rss_kib},
    server::Server,
};

/// copy: what the service does in a stream, without gRPC: its stream use case
/// (`IngestService::ingest_stream`: one transaction, the stream record, each item checked
/// and sent by binary COPY), fed the same batches in-process; `sessions` of them at once,
/// each with its share.
pub(crate) async fn bench_copy(
    fx: &Arc<Fixtures>,
    rows: u64,
    sessions: usize,
) -> anyhow::Result<Measurement> {
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

pub(crate) async fn copy_rows(
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
pub(crate) async fn bench_row_by_row(fx: &Fixtures, rows: u64) -> anyhow::Result<Measurement> {
    let participation = fx.participation().await?;
    let probe = CpuProbe::start(None);
    let started = Instant::now();
    let mut tx = fx.pool.begin().await?;
    for i in 0..rows {
        insert_plain(&mut *tx, &participation, &fx.sentiment(i)).await?;
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

/// One plain INSERT of `s` for `participation`, with an id made here: what the original
/// pipeline did per row, and the unary baseline's statement.
pub(crate) async fn insert_plain<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    participation: &Participation,
    s: &NewSentiment,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sentiments \
           (id, user_id, participation_id, started_at, ended_at, label, score) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(Uuid::now_v7())
    .bind(participation.user_id)
    .bind(participation.id)
    .bind(s.started_at)
    .bind(s.ended_at)
    .bind(s.label.as_str())
    .bind(s.score)
    .execute(executor)
    .await
    .map(drop)
}

pub(crate) async fn check_stored(
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
pub(crate) async fn stream_rows(
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

pub(crate) async fn bench_grpc_stream(
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

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs `requests` calls of `call` from `concurrency` tasks; returns latencies.
pub(crate) async fn run_concurrently<F, Fut>(
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

/// Peak resident memory of a fresh server while it ingests one stream of `rows`.
pub(crate) async fn bench_rss(
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
