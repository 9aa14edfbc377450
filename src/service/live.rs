//! The live-feed use case (LiveFeed): one feed per stream, each append committed and
//! acknowledged on its own, resumable from the committed position after any cut.
//!
//! Exactly once: a write advances the feed's position from the one this stream knows,
//! under the epoch of its Open, in the transaction that stores its items
//! (`storage::feeds`); items at or below the position are acknowledged again, not
//! stored. A newer Open of the feed bumps the epoch, so an older stream's next write is
//! refused (ABORTED) whichever replica it is on.
//!
//! Pipelined: the stream keeps reading while its feed is being written, up to
//! [`FEED_WINDOW_BYTES`] of appends not yet acknowledged; the appends read meanwhile
//! wait and go to the writers together as the next write (a feed has one write in
//! flight, so its writes commit in order). Replies keep the order of the messages: an
//! error, a Close and a half-close come after the appends before them are answered.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use chrono::Utc;
use futures_util::{Stream, StreamExt, stream};

use super::{IngestService, items::check_item};
use crate::domain::{FeedEntry, FeedMessage, FeedReceipt, FeedReply};
use crate::error::Error;
use crate::storage::{OpenFeed, Storage};

/// Wire bytes of appends a feed may have read and not yet acknowledged; past it the
/// stream is not read until a write commits (HTTP/2 flow control then holds the
/// client). One append is always taken, whatever its size (up to the message limit).
pub const FEED_WINDOW_BYTES: usize = 1 << 20;

type Messages = Pin<Box<dyn Stream<Item = Result<FeedMessage, Error>> + Send>>;

/// The write of a feed in flight.
struct Write {
    commit: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>,
    /// The position it takes the feed to.
    through: u64,
    /// Wire bytes of the appends it carries.
    bytes: usize,
}

impl IngestService {
    /// Serves one LiveFeed stream: a reply to each message, in order. The replies end
    /// after Closed, after the first error (its status ends the call), or when the
    /// client half-closes and its appends are answered (the feed stays open for a
    /// later stream).
    pub fn live_feed<S>(
        &self,
        messages: S,
    ) -> impl Stream<Item = Result<FeedReply, Error>> + Send + 'static
    where
        S: Stream<Item = Result<FeedMessage, Error>> + Send + 'static,
    {
        let session = Session {
            _open: crate::metrics::Gauged::up(crate::metrics::LIVE_FEEDS),
            service: self.clone(),
            messages: Box::pin(messages),
            feed: None,
            owed: VecDeque::new(),
            accepted: 0,
            uncommitted: VecDeque::new(),
            waiting: Vec::new(),
            waiting_bytes: 0,
            writing: None,
            reading: true,
            done: false,
        };
        stream::unfold(session, |mut session| async move {
            let reply = session.next_reply().await?;
            Some((reply, session))
        })
    }
}

/// One LiveFeed stream.
struct Session {
    _open: crate::metrics::Gauged,
    service: IngestService,
    messages: Messages,
    /// The feed, once opened; its `committed_seq` is what this stream has committed.
    feed: Option<OpenFeed>,
    /// The replies owed, in the order of the messages they answer.
    owed: VecDeque<Owed>,
    /// The last sequence number read: committed, being written or waiting.
    accepted: u64,
    /// The items accepted after the feed's committed position, in order: what a resend
    /// of them on this stream must match.
    uncommitted: VecDeque<FeedEntry>,
    /// Items read and checked, to be written after the write in flight.
    waiting: Vec<FeedEntry>,
    waiting_bytes: usize,
    /// The write in flight.
    writing: Option<Write>,
    /// Whether more messages are read (not after a Close, an error or a half-close).
    reading: bool,
    done: bool,
}

/// A reply owed to the client.
enum Owed {
    Opened(FeedReply),
    /// Ack, once the feed is committed through this number; when its append was read.
    Ack(u64, Instant),
    /// The answer to a Close with this `final_seq`.
    Close(u64),
    /// The status that ends the call.
    Fail(Error),
}

/// What a session waits for.
enum Event {
    Written(Result<(), Error>),
    Message(Option<Result<FeedMessage, Error>>),
    ShuttingDown,
}

impl Session {
    async fn next_reply(&mut self) -> Option<Result<FeedReply, Error>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(reply) = self.owed_reply().await {
                self.done = !matches!(reply, Ok(FeedReply::Opened { .. } | FeedReply::Ack { .. }));
                return Some(reply);
            }
            self.start_write();
            if !self.reading && self.writing.is_none() {
                // Half-closed, and every append answered.
                return None;
            }
            let window_open = self.reading
                && self.waiting_bytes + self.writing.as_ref().map_or(0, |w| w.bytes)
                    < FEED_WINDOW_BYTES;
            let writing = &mut self.writing;
            let messages = &mut self.messages;
            let cancelled = self.service.cancel_streams.clone();
            let event = tokio::select! {
                written = async {
                    match writing {
                        Some(write) => (&mut write.commit).await,
                        None => std::future::pending().await,
                    }
                } => Event::Written(written),
                next = messages.next(), if window_open => Event::Message(next),
                () = cancelled.cancelled(), if window_open => Event::ShuttingDown,
            };
            match event {
                Event::Written(outcome) => self.written(outcome),
                Event::Message(Some(Ok(message))) => {
                    if let Err(error) = self.read(message).await {
                        self.fail(error);
                    }
                }
                Event::Message(Some(Err(error))) => self.fail(error),
                Event::Message(None) => self.reading = false,
                Event::ShuttingDown => self.fail(Error::ShuttingDown),
            }
        }
    }

    /// The reply at the front, if it can be given now.
    async fn owed_reply(&mut self) -> Option<Result<FeedReply, Error>> {
        let committed = self.feed.as_ref().map_or(0, |feed| feed.committed_seq);
        match self.owed.front()? {
            Owed::Ack(seq, _) if *seq > committed => return None,
            Owed::Close(_) | Owed::Fail(_) if self.writing.is_some() => return None,
            _ => {}
        }
        Some(match self.owed.pop_front()? {
            Owed::Opened(reply) => Ok(reply),
            Owed::Ack(seq, read) => {
                metrics::histogram!(crate::metrics::LIVE_FEED_ACK_SECONDS)
                    .record(read.elapsed().as_secs_f64());
                Ok(FeedReply::Ack {
                    committed_through: seq,
                })
            }
            Owed::Close(final_seq) => self.close(final_seq).await,
            Owed::Fail(error) => Err(error),
        })
    }

    /// Ends the stream with `error` after the replies owed before it; the appends
    /// waiting are still written (each append stands alone), nothing more is read.
    fn fail(&mut self, error: Error) {
        self.owed.push_back(Owed::Fail(error));
        self.reading = false;
    }

    /// Hands the waiting appends to the writers as one write, if none is in flight.
    fn start_write(&mut self) {
        if self.writing.is_some() || self.waiting.is_empty() {
            return;
        }
        let Some(feed) = self.feed.as_ref() else {
            return;
        };
        let items = std::mem::take(&mut self.waiting);
        let commit = self
            .service
            .storage
            .append_feed(feed, feed.committed_seq, items);
        self.writing = Some(Write {
            commit: Box::pin(commit),
            through: self.accepted,
            bytes: std::mem::take(&mut self.waiting_bytes),
        });
    }

    /// The write in flight ended (a write only starts once the feed is open).
    fn written(&mut self, outcome: Result<(), Error>) {
        let Some(write) = self.writing.take() else {
            return;
        };
        match outcome {
            Ok(()) => {
                if let Some(feed) = self.feed.as_mut() {
                    let written =
                        usize::try_from(write.through - feed.committed_seq).unwrap_or(usize::MAX);
                    self.uncommitted
                        .drain(..written.min(self.uncommitted.len()));
                    feed.committed_seq = write.through;
                }
            }
            Err(error) => {
                // Nothing of this write, nor of what waits behind it, is acknowledged:
                // the status ends the call, and the client resumes from the committed
                // position.
                self.waiting.clear();
                self.waiting_bytes = 0;
                self.uncommitted.clear();
                self.owed.clear();
                self.fail(error);
            }
        }
    }

    async fn read(&mut self, message: FeedMessage) -> Result<(), Error> {
        match message {
            FeedMessage::Open {
                feed_id,
                participation_id,
            } => {
                if self.feed.is_some() {
                    return Err(Error::invalid(
                        "open",
                        "a LiveFeed stream opens one feed, with its first message",
                    ));
                }
                let feed = self
                    .service
                    .storage
                    .open_feed(participation_id, feed_id)
                    .await?
                    .ok_or_else(|| Error::not_found("participation", participation_id))?;
                tracing::info!(%feed_id, epoch = feed.epoch, committed = feed.committed_seq, "feed opened");
                self.owed.push_back(Owed::Opened(FeedReply::Opened {
                    committed_seq: feed.committed_seq,
                    closed: feed.closed_at.is_some(),
                }));
                self.accepted = feed.committed_seq;
                self.feed = Some(feed);
                Ok(())
            }
            FeedMessage::Append {
                first_seq,
                items,
                bytes,
            } => self.append(first_seq, items, bytes).await,
            FeedMessage::Close { final_seq } => {
                opened(&self.feed, "close")?;
                self.owed.push_back(Owed::Close(final_seq));
                self.reading = false;
                Ok(())
            }
        }
    }

    /// Checks an append and queues its new items; its Ack is owed once they commit.
    async fn append(
        &mut self,
        first_seq: u64,
        items: Vec<FeedEntry>,
        bytes: usize,
    ) -> Result<(), Error> {
        let read = Instant::now();
        let feed = opened(&self.feed, "append")?;
        if feed.closed_at.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "feed {} is closed: it takes no more items; a new feed needs a new feed_id",
                feed.feed_id
            )));
        }
        let expected = self.accepted + 1;
        if first_seq > expected {
            return Err(Error::FailedPrecondition(format!(
                "append.first_seq is {first_seq} but feed {} expects {expected} next: items \
                 {expected} to {} are missing; resend from {expected}",
                feed.feed_id,
                first_seq - 1
            )));
        }
        // Items at or below the position read are a resend: acknowledged, not stored,
        // when they are the items sent first.
        let last = first_seq + items.len() as u64 - 1;
        let mut items = items;
        let skip = usize::try_from(expected - first_seq).unwrap_or(usize::MAX);
        let fresh = items.split_off(skip.min(items.len()));
        check_resend(
            &self.service.storage,
            feed,
            &self.uncommitted,
            first_seq,
            &items,
        )
        .await?;
        let feed = opened(&self.feed, "append")?;
        if fresh.is_empty() {
            self.owed
                .push_back(Owed::Ack(last.max(feed.committed_seq), read));
            return Ok(());
        }
        let now = Utc::now();
        let clock = &self.service.clock;
        for (seq, item) in (expected..).zip(&fresh) {
            let checked = match item {
                FeedEntry::Sentiment(s) => check_item(clock, now, &feed.participation, s),
                FeedEntry::Event(e) => check_item(clock, now, &feed.participation, e),
            };
            checked.map_err(|violation| violation.under(&format!("items[{seq}]")))?;
        }
        self.accepted += fresh.len() as u64;
        self.uncommitted.extend(fresh.iter().cloned());
        self.waiting.extend(fresh);
        self.waiting_bytes += bytes;
        self.owed.push_back(Owed::Ack(self.accepted, read));
        Ok(())
    }

    /// Closes the feed at `final_seq`, every append before the Close being committed.
    async fn close(&mut self, final_seq: u64) -> Result<FeedReply, Error> {
        let feed = self.feed.as_mut().ok_or_else(|| {
            Error::internal(anyhow::anyhow!("a feed was closed before it was opened"))
        })?;
        if final_seq != feed.committed_seq {
            return Err(Error::FailedPrecondition(format!(
                "close.final_seq is {final_seq} but feed {} has committed {}: close with the \
                 sequence number of the last acknowledged item",
                feed.feed_id, feed.committed_seq
            )));
        }
        let closed_at = match feed.closed_at {
            Some(closed_at) => closed_at,
            None => self.service.storage.close_feed(feed, final_seq).await?,
        };
        feed.closed_at = Some(closed_at);
        Ok(FeedReply::Closed(FeedReceipt {
            feed_id: feed.feed_id,
            items_stored: final_seq,
            closed_at,
        }))
    }
}

/// The stream's feed; a message other than Open before it is refused.
fn opened<'a>(feed: &'a Option<OpenFeed>, what: &str) -> Result<&'a OpenFeed, Error> {
    feed.as_ref().ok_or_else(|| {
        Error::invalid(
            what,
            "the first message of a LiveFeed stream must be open, naming the feed",
        )
    })
}

/// Refuses a resend (`items`, numbered from `first_seq`, all at or below the position
/// read) that differs from the items sent first: those this stream holds
/// uncommitted, and those stored. An item the retention dropped is not compared.
async fn check_resend(
    storage: &Storage,
    feed: &OpenFeed,
    uncommitted: &VecDeque<FeedEntry>,
    first_seq: u64,
    items: &[FeedEntry],
) -> Result<(), Error> {
    if items.is_empty() {
        return Ok(());
    }
    let committed = feed.committed_seq;
    let differs = |seq: u64| {
        Error::AlreadyExists(format!(
            "item {seq} of feed {} was sent already with other content: a resend must \
             carry the items sent first; new items need new sequence numbers (the feed \
             is committed through {committed})",
            feed.feed_id
        ))
    };
    let last = first_seq + items.len() as u64 - 1;
    if first_seq <= committed {
        let stored = storage
            .stored_feed_items(feed, first_seq, last.min(committed))
            .await?;
        for (seq, item) in stored {
            let sent = usize::try_from(seq - first_seq)
                .ok()
                .and_then(|i| items.get(i));
            if sent.is_some_and(|sent| *sent != item) {
                return Err(differs(seq));
            }
        }
    }
    for (seq, sent) in (first_seq..).zip(items).filter(|(seq, _)| *seq > committed) {
        let first = usize::try_from(seq - committed - 1)
            .ok()
            .and_then(|i| uncommitted.get(i));
        if first.is_some_and(|first| first != sent) {
            return Err(differs(seq));
        }
    }
    Ok(())
}
