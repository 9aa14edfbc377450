//! The LiveFeed client of `krisp-bench live --rpc live-feed`: a feed appends one batch a
//! second and waits for each ack (its latency is what is measured), then closes; and a
//! bulk feed that appends as fast as acks come back.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use krisp_ingest::{
    domain::Participation,
    proto::{
        self, feed_item::Item, ingest_service_client::IngestServiceClient,
        live_feed_request::Frame, live_feed_response::Frame as Reply,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    feeds::{Counters, Ended},
    fixtures::{Fixtures, Measurement},
    probes::CpuProbe,
    server::Server,
};

fn message(frame: Frame) -> proto::LiveFeedRequest {
    proto::LiveFeedRequest { frame: Some(frame) }
}

/// Items `first..first + n` of the fixtures, as feed items.
fn append(fx: &Fixtures, first: u64, n: u64) -> proto::LiveFeedRequest {
    message(Frame::Append(proto::FeedAppend {
        first_seq: first,
        items: (first..first + n)
            .map(|i| proto::FeedItem {
                item: Some(Item::Sentiment(fx.proto_sentiment(i))),
            })
            .collect(),
    }))
}

/// A live feed: Open, one append of `batch` items a second for `seconds`, each waited
/// for (its ack latency recorded), then Close.
pub(crate) async fn feed(
    fx: Arc<Fixtures>,
    channel: Channel,
    participation: Participation,
    starts_after: Duration,
    seconds: u64,
    batch: usize,
    counters: Arc<Counters>,
) -> Ended {
    tokio::time::sleep(starts_after).await;
    counters.opened();
    let fed = run(&fx, channel, &participation, seconds, batch as u64).await;
    counters.open.fetch_sub(1, Ordering::Relaxed);
    match fed {
        Ok((items, latencies)) => Ended::Committed { items, latencies },
        Err(error) => Ended::Failed(match error.downcast_ref::<tonic::Status>() {
            Some(status) => format!("{:?}", status.code()),
            None => error.to_string(),
        }),
    }
}

async fn run(
    fx: &Fixtures,
    channel: Channel,
    participation: &Participation,
    seconds: u64,
    batch: u64,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(message(Frame::Open(proto::FeedOpen {
        feed_id: Uuid::new_v4().to_string(),
        participation_id: participation.id.to_string(),
    })))
    .await?;
    let mut replies = IngestServiceClient::new(channel)
        .live_feed(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut reply = async || -> anyhow::Result<Reply> {
        replies
            .message()
            .await?
            .and_then(|reply| reply.frame)
            .context("the feed ended early")
    };
    let Reply::Opened(_) = reply().await? else {
        bail!("no Opened");
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut latencies = Vec::with_capacity(usize::try_from(seconds)?);
    let mut next = 1;
    for _ in 0..seconds {
        ticks.tick().await;
        let sent = Instant::now();
        tx.send(append(fx, next, batch)).await?;
        match reply().await? {
            Reply::Ack(ack) if ack.committed_through == next + batch - 1 => {
                latencies.push(sent.elapsed());
            }
            other => bail!(
                "expected an ack through {}, got {other:?}",
                next + batch - 1
            ),
        }
        next += batch;
    }
    tx.send(message(Frame::Close(proto::FeedClose {
        final_seq: next - 1,
    })))
    .await?;
    match reply().await? {
        Reply::Closed(closed) if closed.items_stored == next - 1 => Ok((next - 1, latencies)),
        other => bail!("expected Closed, got {other:?}"),
    }
}

/// One feed appending `rows` items, `per_append` at a time, as fast as acks come back
/// (a few appends in flight).
pub(crate) async fn bulk(
    fx: &Arc<Fixtures>,
    server: &Server,
    rows: u64,
    per_append: u64,
) -> anyhow::Result<Measurement> {
    let participation = fx.participation().await?;
    let channel = server.channel().await?;
    let probe = CpuProbe::start(Some(server.pid));
    let started = Instant::now();
    let (tx, rx) = mpsc::channel(8);
    tx.send(message(Frame::Open(proto::FeedOpen {
        feed_id: Uuid::new_v4().to_string(),
        participation_id: participation.id.to_string(),
    })))
    .await?;
    let mut replies = IngestServiceClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .live_feed(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let generator = Arc::clone(fx);
    let sender = tokio::spawn(async move {
        let mut next = 1;
        while next <= rows {
            let n = per_append.min(rows - next + 1);
            tx.send(append(&generator, next, n)).await?;
            next += n;
        }
        tx.send(message(Frame::Close(proto::FeedClose { final_seq: rows })))
            .await?;
        anyhow::Ok(())
    });
    let mut stored = 0;
    while let Some(reply) = replies.message().await? {
        match reply.frame {
            Some(Reply::Ack(ack)) => stored = ack.committed_through,
            Some(Reply::Closed(closed)) => {
                stored = closed.items_stored;
                break;
            }
            _ => {}
        }
    }
    sender.await??;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        stored == rows && fx.stored(&participation).await? == rows,
        "the bulk feed stored {stored} of {rows}"
    );
    Ok(Measurement {
        method: "live-feed".into(),
        concurrency: 1,
        rows,
        elapsed,
        latency: None,
        cpu: probe.stop(),
    })
}
