//! The LiveFeed client of `krisp-bench live --rpc live-feed`, through the client crate's
//! helper: a feed appends one batch a second and waits for each ack (its latency is what
//! is measured), then closes; and a bulk feed that pipelines its appends.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use krisp_ingest::domain::Participation;
use krisp_ingest_client::{
    FeedOptions, LiveFeed,
    proto::{self, feed_item::Item},
};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    feeds::{Counters, Ended},
    fixtures::{Fixtures, Measurement},
    probes::CpuProbe,
    server::Server,
};

/// Items `first..first + n` of the fixtures, as feed items.
fn items(fx: &Fixtures, first: u64, n: u64) -> Vec<proto::FeedItem> {
    (first..first + n)
        .map(|i| proto::FeedItem {
            item: Some(Item::Sentiment(fx.proto_sentiment(i))),
        })
        .collect()
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
    let client = krisp_ingest_client::with_channel(channel, None)?;
    let feed_id = Uuid::new_v4().to_string();
    let participation_id = participation.id.to_string();
    let mut feed = LiveFeed::new(client, feed_id, participation_id, FeedOptions::default());
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut latencies = Vec::with_capacity(usize::try_from(seconds)?);
    let mut next = 1;
    for _ in 0..seconds {
        ticks.tick().await;
        let sent = Instant::now();
        feed.append(items(fx, next, batch)).await?;
        let committed = feed.flush().await?;
        latencies.push(sent.elapsed());
        anyhow::ensure!(
            committed == next + batch - 1,
            "expected an ack through {}, got {committed}",
            next + batch - 1
        );
        next += batch;
    }
    let closed = feed.close().await?;
    anyhow::ensure!(closed.items_stored == next - 1, "closed at {closed:?}");
    Ok((next - 1, latencies))
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
    let client =
        krisp_ingest_client::with_channel(channel, None)?.max_encoding_message_size(64 << 20);
    // Eight appends in flight: well within the server's 1 MiB read-ahead at 1,000 items.
    let options = FeedOptions {
        window_items: usize::try_from(per_append * 8)?,
        window_appends: 8,
        ..FeedOptions::default()
    };
    let feed_id = Uuid::new_v4().to_string();
    let mut feed = LiveFeed::new(client, feed_id, participation.id.to_string(), options);
    let mut next = 1;
    while next <= rows {
        let n = per_append.min(rows - next + 1);
        feed.append(items(fx, next, n)).await?;
        next += n;
    }
    let stored = feed.close().await?.items_stored;
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
