//! The client-stream use case: one stream, one transaction, all or nothing.
//!
//! A stream spools its items as they arrive, each checked at once, and holds no database
//! connection while it waits for its client. It takes a connection only to write: at
//! its trailer (one short transaction: claim the stream id, COPY the spool, receipt,
//! commit), or as soon as it sends as fast as a bulk upload, which is then written as it
//! arrives (pipelined COPY). A bulk stream whose client then falls silent for
//! [`StreamLimits::writer_idle`] gives its connection back (the COPY is abandoned, the spool still
//! holds every item) and spools to its trailer.

use std::{marker::PhantomData, pin::Pin, time::Duration};

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    IngestService, StreamLimits,
    items::check_item,
    settle::{Settling, still_unknown},
};
use crate::domain::{Frame, Participation, Receipt, StreamHeader};
use crate::error::{Error, FieldViolation};

/// How a stream whose outcome is unknown is retried.
const RETRY_STREAM: &str = "a retry with the same stream_id and items is safe: it returns the first receipt, or stores the stream once";
use crate::metrics::{self as names, Gauged};
use crate::storage::{
    self, FeedCopy, FeedTable, Spool, StreamClaim, StreamConnection, claim_stream, finish_stream,
    hold_participation,
};

impl IngestService {
    /// Ingests one client stream in one transaction. The stream must be a header, any
    /// number of batches, and a trailer whose count matches, followed by the end of the
    /// stream. Anything else (including a stream that merely stops, which is what a
    /// cancelled or broken-off client looks like) stores nothing.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn ingest_stream<T, S>(&self, frames: S) -> Result<Receipt, Error>
    where
        T: FeedTable,
        S: Stream<Item = Result<Frame<T>, Error>> + Send,
    {
        let mut frames = std::pin::pin!(frames);
        let StreamHeader {
            stream_id,
            participation_id,
        } = header(&mut frames).await?;
        let participation = self.get_participation(participation_id).await?;
        let _open = Gauged::up(names::ACTIVE_STREAMS);
        let mut feed = Feed {
            frames,
            spool: self.spooler.spool(),
            participation,
            stream_id,
            received: 0,
            latest: None,
            ended: false,
            ends_at: Instant::now() + self.limits.max_duration,
            committing: false,
            service: self,
            _items: PhantomData,
        };
        let outcome = tokio::select! {
            outcome = self.run(&mut feed) => outcome,
            () = self.cancel_streams.cancelled() => Err(Error::ShuttingDown),
        };
        match outcome {
            // Stopped while its COMMIT was on the way: it may be stored.
            Err(Error::ShuttingDown) if feed.committing => Err(Error::OutcomeUnknown {
                retry: RETRY_STREAM,
                cause: sqlx::Error::Io(std::io::Error::other(
                    "the server shut down while the stream's transaction committed",
                )),
            }),
            outcome => outcome,
        }
    }

    async fn run<T: FeedTable, S>(&self, feed: &mut Feed<'_, T, S>) -> Result<Receipt, Error>
    where
        S: Stream<Item = Result<Frame<T>, Error>>,
    {
        // A stream is written through at most once before its trailer: one that fell
        // silent after a burst spools the rest.
        let mut may_write_through = true;
        loop {
            let write_through = |feed: &Feed<'_, T, S>| may_write_through && feed.spool.is_bulk();
            while !feed.ended && !write_through(feed) {
                feed.take(None).await?;
                feed.spool.spill_if_due(None).await?;
            }
            may_write_through = false;
            match self.write_settled(feed).await? {
                Written::Committed(receipt) => return Ok(receipt),
                Written::Idle => {}
                Written::Replay { receipt, digest } => {
                    return feed.replay(receipt, digest).await;
                }
            }
        }
    }

    /// [`Self::write`], and again when its commit's answer was lost
    /// ([`super::settle`]): the second write finds the stream id committed (and answers
    /// with its receipt, the items compared by their digest) or commits it now.
    async fn write_settled<T: FeedTable, S>(
        &self,
        feed: &mut Feed<'_, T, S>,
    ) -> Result<Written, Error>
    where
        S: Stream<Item = Result<Frame<T>, Error>>,
    {
        let cause = match self.write(feed).await {
            Err(Error::OutcomeUnknown { cause, .. }) => cause,
            written => return written,
        };
        let mut settling = Settling::start();
        while settling.pause().await {
            match self.write(feed).await {
                Err(error) if still_unknown(&error) => {}
                written => return settling.found(written),
            }
        }
        Err(settling.unknown(RETRY_STREAM, cause))
    }

    /// Takes a connection and writes the stream: what it has spooled, then, if its
    /// trailer has not come yet, its items as they arrive. Commits once the trailer is
    /// in; gives the connection back if the client falls silent first.
    async fn write<T: FeedTable, S>(&self, feed: &mut Feed<'_, T, S>) -> Result<Written, Error>
    where
        S: Stream<Item = Result<Frame<T>, Error>>,
    {
        // With a deadline, the answer (RESOURCE_EXHAUSTED and RetryInfo) must leave before
        // it: a tenth of what is left, up to 100 ms, is kept for that.
        let left = feed.ends_at.saturating_duration_since(Instant::now());
        let wait = crate::deadline::remaining().map_or(left, |call| {
            let margin = (call / 10).min(Duration::from_millis(100));
            call.saturating_sub(margin).min(left)
        });
        let asked = std::time::Instant::now();
        let _slot = self.storage.stream_slot(wait).await?;
        let mut conn = StreamConnection::acquire(self.storage.pool()).await?;
        let waited = asked.elapsed();
        let mut tx = storage::begin_on(conn.conn()?).await?;
        let (participation, stream_id) = (feed.participation.clone(), feed.stream_id);
        let ended_now = hold_participation(&mut tx, &participation)
            .await?
            .ok_or_else(|| Error::not_found("participation", participation.id))?;
        // A stream whose trailer is in is claimed and recorded complete in one statement.
        let digest = feed.ended.then(|| feed.spool.digest());
        let finished = digest.as_deref().map(|digest| (feed.received, digest));
        let recorded =
            match claim_stream(&mut tx, &participation, stream_id, T::KIND, finished).await? {
                StreamClaim::New { committed_at } => {
                    feed.left_at(ended_now)?;
                    committed_at
                }
                StreamClaim::Committed {
                    participation_id,
                    kind,
                    receipt,
                    digest,
                } => {
                    if participation_id != participation.id || kind != T::KIND {
                        return Err(Error::AlreadyExists(format!(
                            "stream id {stream_id} was used already for a stream of {kind} of \
                         participation {participation_id}"
                        )));
                    }
                    drop(tx);
                    conn.ended_cleanly();
                    return Ok(Written::Replay { receipt, digest });
                }
            };

        let mut copy = FeedCopy::begin::<T>(&mut tx).await?;
        let piped = async {
            feed.spool.send_spooled(&mut copy, !feed.ended).await?;
            while !feed.ended {
                if !feed.take(Some(self.limits.writer_idle)).await? {
                    return Ok(false);
                }
                feed.spool.spill_if_due(Some(&mut copy)).await?;
            }
            feed.spool.send_rest(&mut copy).await?;
            Ok(true)
        };
        match piped.await {
            Ok(true) => {}
            Ok(false) => {
                let aborted = copy.abort("the client fell silent").await;
                drop(tx);
                if aborted {
                    conn.ended_cleanly();
                }
                tracing::debug!(%stream_id, "a silent stream gave its connection back");
                return Ok(Written::Idle);
            }
            Err(error) => {
                let aborted = copy.abort("the stream failed").await;
                drop(tx);
                if aborted {
                    conn.ended_cleanly();
                }
                return Err(error);
            }
        }
        let stored = copy.finish().await?;
        let received = feed.received;
        if stored != received {
            return Err(Error::internal(anyhow::anyhow!(
                "COPY stored {stored} rows of {received}"
            )));
        }
        let committing = std::time::Instant::now();
        let committed_at = match recorded {
            Some(committed_at) => committed_at,
            None => {
                let digest = feed.spool.digest();
                finish_stream(&mut tx, &participation, stream_id, received, &digest).await?
            }
        };
        feed.committing = true;
        tx.commit().await.map_err(|e| Error::from(e).at_commit())?;
        feed.committing = false;
        conn.ended_cleanly();
        metrics::histogram!(names::STREAM_COMMIT_SECONDS)
            .record(committing.elapsed().as_secs_f64());
        crate::metrics::db_time("stream_write", committing);
        metrics::histogram!(names::STREAM_ROWS).record(received as f64);
        metrics::counter!(names::ITEMS_INGESTED, "kind" => T::KIND).increment(received);
        tracing::info!(
            %stream_id,
            items = received,
            kind = T::KIND,
            waited_ms = waited.as_millis() as u64,
            wrote_ms = asked.elapsed().as_millis() as u64,
            "stream committed"
        );
        Ok(Written::Committed(Receipt {
            stream_id,
            items_stored: received,
            committed_at,
            replayed: false,
        }))
    }
}

/// How a write ended.
enum Written {
    Committed(Receipt),
    /// The client fell silent: the connection went back, the spool has every item.
    Idle,
    /// The stream id committed before, with this receipt and digest.
    Replay {
        receipt: Receipt,
        digest: Option<Vec<u8>>,
    },
}

/// One stream being received: its frames and its spool.
struct Feed<'a, T, S> {
    frames: Pin<&'a mut S>,
    spool: Spool,
    participation: Participation,
    stream_id: Uuid,
    /// Items received so far.
    received: u64,
    /// The latest end of an item received so far, and that item's index.
    latest: Option<(DateTime<Utc>, u64)>,
    /// The trailer came, and the end of the stream after it.
    ended: bool,
    /// When the stream's time is up.
    ends_at: Instant,
    /// Its COMMIT is on the way (a shutdown that stops it now cannot say it is not stored).
    committing: bool,
    service: &'a IngestService,
    _items: PhantomData<T>,
}

impl<T: FeedTable, S> Feed<'_, T, S>
where
    S: Stream<Item = Result<Frame<T>, Error>>,
{
    fn limits(&self) -> StreamLimits {
        self.service.limits
    }

    /// Reads and takes in the next message: a batch is checked and spooled, a trailer
    /// checked against the count and followed by the end of the stream. With `idle`,
    /// `false` when nothing came within it.
    async fn take(&mut self, idle: Option<Duration>) -> Result<bool, Error> {
        let until = idle.map_or(self.ends_at, |idle| {
            (Instant::now() + idle).min(self.ends_at)
        });
        let frame = match tokio::time::timeout_at(until, self.frames.next()).await {
            Ok(frame) => frame,
            Err(_) if Instant::now() < self.ends_at => return Ok(false),
            Err(_) => return Err(self.too_long()),
        };
        match frame.transpose()? {
            Some(Frame::Batch(items)) => self.accept(&items)?,
            Some(Frame::Trailer { item_count }) => {
                if item_count != self.received {
                    return Err(Error::InvalidArgument(vec![FieldViolation::new(
                        "trailer.item_count",
                        format!(
                            "the trailer counts {item_count} items but the stream carried {}",
                            self.received
                        ),
                    )]));
                }
                let end = tokio::time::timeout_at(self.ends_at, self.frames.next())
                    .await
                    .map_err(|_| self.too_long())?;
                if end.transpose()?.is_some() {
                    return Err(Error::invalid(
                        "trailer",
                        "the trailer must be the last message of a stream",
                    ));
                }
                self.ended = true;
            }
            Some(Frame::Header(_)) => {
                return Err(Error::invalid(
                    "header",
                    "a stream has one header, as its first message",
                ));
            }
            None => {
                return Err(Error::invalid(
                    "trailer",
                    "the stream ended without a trailer, so nothing was stored: \
                     finish a stream with a trailer carrying its item count",
                ));
            }
        }
        Ok(true)
    }

    /// Checks a batch's items and spools them.
    fn accept(&mut self, items: &[T]) -> Result<(), Error> {
        let limits = self.limits();
        if self.received + items.len() as u64 > limits.max_items {
            return Err(Error::ResourceExhausted {
                message: format!(
                    "the stream carries more than the server's limit of {} items, so \
                     nothing was stored: split it into several streams",
                    limits.max_items
                ),
                retry_after: None,
            });
        }
        let now = Utc::now();
        for item in items {
            check_item(&self.service.clock, now, &self.participation, item)
                .map_err(|e| e.under(&format!("{}[{}]", T::FIELD, self.received)))?;
            self.spool
                .push(Uuid::now_v7(), &self.participation, self.stream_id, item)?;
            let (_, end) = item.span();
            if self.latest.is_none_or(|(latest, _)| end > latest) {
                self.latest = Some((end, self.received));
            }
            self.received += 1;
        }
        Ok(())
    }

    /// Takes in when the participation ended as it stands in the stream's transaction
    /// (`None`: still open): the items received so far must end by then, and the ones
    /// still to come are checked against it.
    fn left_at(&mut self, ended: Option<DateTime<Utc>>) -> Result<(), Error> {
        let Some(gone) = ended else {
            return Ok(());
        };
        self.participation.disconnected_at = Some(gone);
        match self.latest {
            Some((end, at)) if end > gone => Err(Error::InvalidArgument(vec![
                FieldViolation::new(
                    T::END_FIELD,
                    format!("is after the participation ended ({gone}), while the stream was open"),
                )
                .under(&format!("{}[{at}]", T::FIELD)),
            ])),
            _ => Ok(()),
        }
    }

    fn too_long(&self) -> Error {
        Error::ResourceExhausted {
            message: format!(
                "the stream was open longer than the server's limit of {} s, so nothing was \
                 stored: send shorter streams",
                self.limits().max_duration.as_secs()
            ),
            retry_after: None,
        }
    }

    /// A stream whose id committed already: its items are read to the trailer and
    /// compared with the first commit's. The same items get the first receipt
    /// (`replayed`), other items ALREADY_EXISTS; nothing is stored.
    async fn replay(
        &mut self,
        receipt: Receipt,
        committed: Option<Vec<u8>>,
    ) -> Result<Receipt, Error> {
        self.spool.discard();
        while !self.ended {
            self.take(None).await?;
        }
        let stream_id = receipt.stream_id;
        match committed {
            Some(committed) if committed != self.spool.digest() => {
                Err(Error::AlreadyExists(format!(
                    "stream id {stream_id} committed already with other items ({} then, {} \
                     now): a retry must send the same items; new items need a new stream_id",
                    receipt.items_stored, self.received
                )))
            }
            _ => {
                tracing::info!(%stream_id, "replayed stream: returning the first receipt");
                Ok(receipt)
            }
        }
    }
}

/// Reads a stream's first message, which must be its header.
async fn header<T, S>(frames: &mut Pin<&mut S>) -> Result<StreamHeader, Error>
where
    S: Stream<Item = Result<Frame<T>, Error>>,
{
    match frames.next().await.transpose()? {
        Some(Frame::Header(header)) => Ok(header),
        Some(_) => Err(Error::invalid(
            "header",
            "the first message of a stream must be its header",
        )),
        None => Err(Error::invalid(
            "header",
            "the stream ended before its header",
        )),
    }
}
