//! The live-feed use case (LiveFeed): one feed per stream, each append committed and
//! acknowledged on its own, resumable from the committed position after any cut.
//!
//! Exactly once: an append advances the feed's position from the one this stream knows,
//! under the epoch of its Open, in the transaction that stores its items
//! (`storage::feeds`); items at or below the position are acknowledged again, not
//! stored. A newer Open of the feed bumps the epoch, so an older stream's next write is
//! refused (ABORTED) whichever replica it is on.

use std::pin::Pin;

use chrono::Utc;
use futures_util::{Stream, StreamExt, stream};

use super::{IngestService, items::check_item};
use crate::domain::{FeedEntry, FeedMessage, FeedReceipt, FeedReply};
use crate::error::Error;
use crate::storage::OpenFeed;

type Messages = Pin<Box<dyn Stream<Item = Result<FeedMessage, Error>> + Send>>;

impl IngestService {
    /// Serves one LiveFeed stream: a reply to each message, in order. The replies end
    /// after Closed, after the first error (its status ends the call), or when the
    /// client half-closes (the feed stays open for a later stream).
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
            done: false,
        };
        stream::unfold(session, |mut session| async move {
            if session.done {
                return None;
            }
            let next = tokio::select! {
                next = session.messages.next() => next?,
                () = session.service.cancel_streams.cancelled() => Err(Error::ShuttingDown),
            };
            let reply = match next {
                Ok(message) => session.handle(message).await,
                Err(error) => Err(error),
            };
            session.done = !matches!(reply, Ok(FeedReply::Opened { .. } | FeedReply::Ack { .. }));
            Some((reply, session))
        })
    }
}

/// One LiveFeed stream.
struct Session {
    _open: crate::metrics::Gauged,
    service: IngestService,
    messages: Messages,
    /// The feed, once opened.
    feed: Option<OpenFeed>,
    done: bool,
}

impl Session {
    async fn handle(&mut self, message: FeedMessage) -> Result<FeedReply, Error> {
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
                let reply = FeedReply::Opened {
                    committed_seq: feed.committed_seq,
                    closed: feed.closed_at.is_some(),
                };
                self.feed = Some(feed);
                Ok(reply)
            }
            FeedMessage::Append { first_seq, items } => self.append(first_seq, items).await,
            FeedMessage::Close { final_seq } => {
                let feed = opened(&mut self.feed, "close")?;
                if final_seq != feed.committed_seq {
                    return Err(Error::FailedPrecondition(format!(
                        "close.final_seq is {final_seq} but feed {} has committed {}: close \
                         with the sequence number of the last acknowledged item",
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
    }

    async fn append(&mut self, first_seq: u64, items: Vec<FeedEntry>) -> Result<FeedReply, Error> {
        let feed = opened(&mut self.feed, "append")?;
        if feed.closed_at.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "feed {} is closed: it takes no more items; a new feed needs a new feed_id",
                feed.feed_id
            )));
        }
        let committed = feed.committed_seq;
        let expected = committed + 1;
        if first_seq > expected {
            return Err(Error::FailedPrecondition(format!(
                "append.first_seq is {first_seq} but feed {} expects {expected} next: items \
                 {expected} to {} are missing; resend from {expected}",
                feed.feed_id,
                first_seq - 1
            )));
        }
        // Items at or below the committed position are a resend: acknowledged, not stored.
        let mut items = items;
        let skip = usize::try_from(expected - first_seq).unwrap_or(usize::MAX);
        let fresh = items.split_off(skip.min(items.len()));
        if fresh.is_empty() {
            return Ok(FeedReply::Ack {
                committed_through: committed,
            });
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
        let through = committed + fresh.len() as u64;
        self.service
            .storage
            .append_feed(feed, committed, fresh)
            .await?;
        feed.committed_seq = through;
        Ok(FeedReply::Ack {
            committed_through: feed.committed_seq,
        })
    }
}

/// The stream's feed; a message other than Open before it is refused.
fn opened<'a>(feed: &'a mut Option<OpenFeed>, what: &str) -> Result<&'a mut OpenFeed, Error> {
    feed.as_mut().ok_or_else(|| {
        Error::invalid(
            what,
            "the first message of a LiveFeed stream must be open, naming the feed",
        )
    })
}
