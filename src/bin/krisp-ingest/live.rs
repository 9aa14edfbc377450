//! `feed --live`: the simulated voice service as a resumable live feed (LiveFeed), through
//! the client crate's helper: batches pipelined up to its window, each item kept until
//! acknowledged, the feed resumed after retryable errors where the server says.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use krisp_ingest_client::{FeedOptions, LiveFeed};
use uuid::Uuid;

use crate::cli::FeedArgs;
use crate::connection::{connect, sentiment};
use krisp_ingest::proto::{self, feed_item::Item};

pub async fn feed(
    args: &FeedArgs,
    participation_id: &str,
    connected: chrono::DateTime<chrono::Utc>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let client = connect(&args.client).await?;
    let feed_id = Uuid::new_v4().to_string();
    let started = Instant::now();
    let mut feed = LiveFeed::new(client, &feed_id, participation_id, FeedOptions::default());
    let batch = (args.batch_size as u64).max(1);
    let mut next = 1;
    while next <= args.count {
        let n = batch.min(args.count - next + 1);
        let items = (next..next + n)
            .map(|seq| proto::FeedItem {
                item: Some(Item::Sentiment(sentiment(connected, seq - 1))),
            })
            .collect();
        let committed = feed.append(items).await.map_err(failed)?;
        bar.set_position(committed);
        next += n;
        if args.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
    }
    let sessions = feed.sessions();
    let closed = feed.close().await.map_err(failed)?;
    bar.set_position(closed.items_stored);
    bar.finish();
    let elapsed = started.elapsed().max(Duration::from_millis(1));
    println!(
        "feed {} closed: {} sentiments for participation {participation_id} in {:.2?} \
         ({:.0} sentiments/s, {sessions} session(s))",
        closed.feed_id,
        closed.items_stored,
        elapsed,
        closed.items_stored as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

fn failed(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("LiveFeed failed: {:?}: {}", status.code(), status.message())
}
