//! `feed --live`: the simulated voice service as a resumable live feed (LiveFeed). Every
//! batch waits for its ack; after a retryable error the feed is opened again (a new
//! connection) and resumed from the position the server reports.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::cli::FeedArgs;
use crate::connection::{connect, sentiment};
use krisp_ingest::proto::{
    self, feed_item::Item, live_feed_request::Frame, live_feed_response::Frame as Reply,
};

/// Attempts in a row that may fail before the feed gives up.
const ATTEMPTS: u32 = 10;

pub async fn feed(
    args: &FeedArgs,
    participation_id: &str,
    connected: chrono::DateTime<chrono::Utc>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let feed_id = Uuid::new_v4().to_string();
    let started = Instant::now();
    let mut committed = 0;
    let mut sessions = 0;
    let mut failures = 0;
    let closed = loop {
        sessions += 1;
        let outcome = session(
            args,
            &feed_id,
            participation_id,
            connected,
            &mut committed,
            bar,
        )
        .await;
        match outcome {
            Ok(closed) => break closed,
            Err(status) if retryable(status.code()) && failures + 1 < ATTEMPTS => {
                failures += 1;
                bar.println(format!(
                    "feed {feed_id}: {:?}: {}; resuming after {committed}",
                    status.code(),
                    status.message()
                ));
                tokio::time::sleep(Duration::from_millis(100 << failures.min(6))).await;
            }
            Err(status) => {
                anyhow::bail!("LiveFeed failed: {:?}: {}", status.code(), status.message())
            }
        }
    };
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

/// Errors after which resuming can succeed.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Aborted
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
    )
}

/// One stream of the feed: Open, the batches from the committed position on, Close.
async fn session(
    args: &FeedArgs,
    feed_id: &str,
    participation_id: &str,
    connected: chrono::DateTime<chrono::Utc>,
    committed: &mut u64,
    bar: &ProgressBar,
) -> Result<proto::FeedClosed, Status> {
    let mut client = connect(&args.client)
        .await
        .map_err(|error| Status::unavailable(format!("{error:#}")))?;
    let (tx, rx) = mpsc::channel(4);
    let send = |frame| {
        let tx = tx.clone();
        async move {
            tx.send(proto::LiveFeedRequest { frame: Some(frame) })
                .await
                .map_err(|_| Status::unavailable("the feed's stream closed"))
        }
    };
    send(Frame::Open(proto::FeedOpen {
        feed_id: feed_id.to_owned(),
        participation_id: participation_id.to_owned(),
    }))
    .await?;
    let mut replies = client
        .live_feed(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut reply = async || -> Result<Reply, Status> {
        replies
            .message()
            .await?
            .and_then(|reply| reply.frame)
            .ok_or_else(|| Status::unavailable("the feed's stream ended"))
    };
    let Reply::Opened(opened) = reply().await? else {
        return Err(Status::internal(
            "the server did not answer Open with Opened",
        ));
    };
    *committed = opened.committed_seq;
    let batch = args.batch_size as u64;
    while *committed < args.count {
        let first = *committed + 1;
        let n = batch.min(args.count - *committed);
        let items = (first..first + n)
            .map(|seq| proto::FeedItem {
                item: Some(Item::Sentiment(sentiment(connected, seq - 1))),
            })
            .collect();
        send(Frame::Append(proto::FeedAppend {
            first_seq: first,
            items,
        }))
        .await?;
        match reply().await? {
            Reply::Ack(ack) => *committed = ack.committed_through,
            _ => {
                return Err(Status::internal(
                    "the server did not answer Append with Ack",
                ));
            }
        }
        bar.set_position(*committed);
        if args.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
    }
    send(Frame::Close(proto::FeedClose {
        final_seq: args.count,
    }))
    .await?;
    match reply().await? {
        Reply::Closed(closed) => Ok(closed),
        _ => Err(Status::internal(
            "the server did not answer Close with Closed",
        )),
    }
}
