//! A live feed for the LiveFeed RPC that keeps up: appends are pipelined up to a window
//! (acks come back one per append, in order), every item is kept until it is
//! acknowledged, and any retryable error (a dropped connection, a replica gone, the
//! database briefly away, ABORTED because another stream took the feed over) reopens the
//! feed and resends from the position the server reports, so each item is stored exactly
//! once. Errors retrying cannot fix are returned.

use std::{collections::VecDeque, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Status, Streaming};

use crate::{
    Client,
    errors::retryable,
    proto::{
        FeedAppend, FeedClose, FeedClosed, FeedItem, FeedOpen, LiveFeedRequest, LiveFeedResponse,
        live_feed_request::Frame, live_feed_response::Frame as Reply,
    },
};

/// How a feed pipelines and retries.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// The sequence number of the first item appended; by default the one after the
    /// feed's committed position. A process that numbers items itself (and may resend
    /// after a restart) gives it: a resend of items the server holds with other content
    /// is refused with ALREADY_EXISTS naming the item.
    pub first_seq: Option<u64>,
    /// Items sent and not yet acknowledged at most (the server reads 1 MiB ahead).
    pub window_items: usize,
    /// Appends sent and not yet acknowledged at most; 1 waits for every ack.
    pub window_appends: usize,
    /// Attempts in a row per step before its error is returned, and the first backoff
    /// (doubled after each failure).
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            first_seq: None,
            window_items: 4096,
            window_appends: 32,
            attempts: 8,
            backoff: Duration::from_millis(100),
        }
    }
}

/// One LiveFeed call.
struct Stream {
    requests: mpsc::UnboundedSender<LiveFeedRequest>,
    replies: Streaming<LiveFeedResponse>,
}

/// What to wait for.
#[derive(Clone, Copy)]
enum Until {
    Open,
    Room,
    Empty,
}

/// A resuming, pipelined feed of one participation.
pub struct LiveFeed {
    client: Client,
    feed_id: String,
    participation_id: String,
    options: FeedOptions,
    /// The appends sent and not yet acknowledged, in order.
    in_flight: VecDeque<FeedAppend>,
    items: usize,
    committed: u64,
    next_seq: Option<u64>,
    sessions: u32,
    stream: Option<Stream>,
}

impl LiveFeed {
    pub fn new(
        client: Client,
        feed_id: impl Into<String>,
        participation_id: impl Into<String>,
        options: FeedOptions,
    ) -> Self {
        let next_seq = options.first_seq;
        Self {
            client,
            feed_id: feed_id.into(),
            participation_id: participation_id.into(),
            options,
            in_flight: VecDeque::new(),
            items: 0,
            committed: 0,
            next_seq,
            sessions: 0,
            stream: None,
        }
    }

    /// The feed's position the server acknowledged last.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Streams opened so far: 1 + the resumptions.
    pub fn sessions(&self) -> u32 {
        self.sessions
    }

    /// Appends sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends `items` numbered on from the last append; waits (reading acks) while the
    /// window is full. Returns the committed position known so far.
    pub async fn append(&mut self, items: Vec<FeedItem>) -> Result<u64, Status> {
        if items.is_empty() {
            return Err(Status::invalid_argument(
                "an append carries one item at least",
            ));
        }
        self.settle(Until::Open).await?;
        let first_seq = self
            .next_seq
            .ok_or_else(|| Status::internal("the feed opened without a position"))?;
        self.next_seq = Some(first_seq + items.len() as u64);
        self.items += items.len();
        let append = FeedAppend { first_seq, items };
        if let Some(stream) = &self.stream
            && stream
                .requests
                .send(request(Frame::Append(append.clone())))
                .is_err()
        {
            self.cut(); // the next open resends it
        }
        self.in_flight.push_back(append);
        self.settle(Until::Room).await?;
        Ok(self.committed)
    }

    /// Waits until every item appended is committed; returns the position.
    pub async fn flush(&mut self) -> Result<u64, Status> {
        self.settle(Until::Empty).await?;
        Ok(self.committed)
    }

    /// Closes the feed once everything is committed; returns its receipt.
    pub async fn close(mut self) -> Result<FeedClosed, Status> {
        let mut failures = 0;
        loop {
            match self.close_once().await {
                Ok(closed) => return Ok(closed),
                Err(status) => self.after_failure(status, &mut failures).await?,
            }
        }
    }

    /// Drops the current stream, as a broken connection would; the next call resumes.
    pub fn cut(&mut self) {
        self.stream = None;
    }

    async fn close_once(&mut self) -> Result<FeedClosed, Status> {
        self.wait(Until::Empty).await?;
        let final_seq = self.committed;
        self.send(Frame::Close(FeedClose { final_seq }))?;
        match self.receive().await? {
            Reply::Closed(closed) => Ok(closed),
            other => Err(unexpected(&other, "Closed")),
        }
    }

    /// Waits for `until`, reopening and resending after retryable errors.
    async fn settle(&mut self, until: Until) -> Result<(), Status> {
        let mut failures = 0;
        loop {
            match self.wait(until).await {
                Ok(()) => return Ok(()),
                Err(status) => self.after_failure(status, &mut failures).await?,
            }
        }
    }

    /// `Err(status)` when it is final or the attempts are spent; otherwise drops the
    /// stream and waits the backoff.
    async fn after_failure(&mut self, status: Status, failures: &mut u32) -> Result<(), Status> {
        *failures += 1;
        if !retryable(status.code()) || *failures >= self.options.attempts {
            return Err(status);
        }
        self.cut();
        tokio::time::sleep(self.options.backoff * (1 << (*failures - 1).min(10))).await;
        Ok(())
    }

    async fn wait(&mut self, until: Until) -> Result<(), Status> {
        if self.stream.is_none() {
            self.open().await?;
        }
        loop {
            let more = match until {
                Until::Open => false,
                Until::Room => {
                    self.items >= self.options.window_items
                        || self.in_flight.len() >= self.options.window_appends
                }
                Until::Empty => !self.in_flight.is_empty(),
            };
            if !more {
                return Ok(());
            }
            match self.receive().await? {
                Reply::Ack(ack) => self.acknowledged(ack.committed_through),
                other => return Err(unexpected(&other, "Ack")),
            }
        }
    }

    async fn open(&mut self) -> Result<(), Status> {
        let (requests, rx) = mpsc::unbounded_channel();
        let open = request(Frame::Open(FeedOpen {
            feed_id: self.feed_id.clone(),
            participation_id: self.participation_id.clone(),
        }));
        requests
            .send(open)
            .map_err(|_| Status::unavailable("the feed's stream closed"))?;
        let replies = self
            .client
            .live_feed(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        self.stream = Some(Stream { requests, replies });
        let opened = match self.receive().await? {
            Reply::Opened(opened) => opened,
            other => return Err(unexpected(&other, "Opened")),
        };
        self.sessions += 1;
        if opened.committed_seq < self.committed {
            return Err(Status::data_loss(format!(
                "the server reports position {}, below the {} it acknowledged before",
                opened.committed_seq, self.committed
            )));
        }
        self.acknowledged(opened.committed_seq);
        self.next_seq.get_or_insert(opened.committed_seq + 1);
        for append in &self.in_flight {
            self.send(Frame::Append(append.clone()))?;
        }
        Ok(())
    }

    fn send(&self, frame: Frame) -> Result<(), Status> {
        self.stream
            .as_ref()
            .ok_or_else(|| Status::unavailable("the feed is not open"))?
            .requests
            .send(request(frame))
            .map_err(|_| Status::unavailable("the feed's stream closed"))
    }

    async fn receive(&mut self) -> Result<Reply, Status> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| Status::unavailable("the feed is not open"))?;
        stream
            .replies
            .message()
            .await?
            .and_then(|reply| reply.frame)
            .ok_or_else(|| Status::unavailable("the feed's stream ended"))
    }

    /// Every item up to `through` is committed: drops the appends it covers.
    fn acknowledged(&mut self, through: u64) {
        self.committed = self.committed.max(through);
        while let Some(first) = self.in_flight.front_mut() {
            let count = first.items.len() as u64;
            if first.first_seq + count <= through + 1 {
                self.items -= first.items.len();
                self.in_flight.pop_front();
            } else {
                if first.first_seq <= through {
                    // Only an ack of an append sent differently covers part of one.
                    let covered =
                        usize::try_from(through + 1 - first.first_seq).unwrap_or(first.items.len());
                    first.items.drain(..covered);
                    first.first_seq = through + 1;
                    self.items -= covered;
                }
                break;
            }
        }
    }
}

fn request(frame: Frame) -> LiveFeedRequest {
    LiveFeedRequest { frame: Some(frame) }
}

fn unexpected(reply: &Reply, expected: &str) -> Status {
    let got = match reply {
        Reply::Opened(_) => "Opened",
        Reply::Ack(_) => "Ack",
        Reply::Closed(_) => "Closed",
    };
    Status::internal(format!(
        "the server answered {got} where {expected} was due"
    ))
}
