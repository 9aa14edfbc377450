//! The client-stream use case: one stream, one transaction, all or nothing.

use chrono::Utc;
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

use super::{
    IngestService, StreamLimits,
    items::{check_clock, check_span},
};
use crate::domain::{Frame, ItemClock, Participation, Receipt, StreamHeader};
use crate::error::{Error, FieldViolation};
use crate::storage::{self, FeedCopy, FeedTable, ItemDigest, StreamClaim, StreamConnection};

impl IngestService {
    /// Ingests one client stream in one transaction. The stream must be a header, any
    /// number of batches, and a trailer whose count matches, followed by the end of the
    /// stream. Anything else (including a stream that merely stops, which is what a
    /// cancelled or broken-off client looks like) rolls the transaction back.
    pub async fn ingest_stream<T, S>(&self, frames: S) -> Result<Receipt, Error>
    where
        T: FeedTable,
        S: Stream<Item = Result<Frame<T>, Error>> + Send,
    {
        let mut frames = std::pin::pin!(frames);
        let header = match frames.next().await.transpose()? {
            Some(Frame::Header(header)) => header,
            Some(_) => {
                return Err(Error::invalid(
                    "header",
                    "the first message of a stream must be its header",
                ));
            }
            None => {
                return Err(Error::invalid(
                    "header",
                    "the stream ended before its header",
                ));
            }
        };
        let StreamHeader {
            stream_id,
            participation_id,
        } = header;
        let participation = self.get_participation(participation_id).await?;

        let _active = crate::metrics::Gauged::up(crate::metrics::ACTIVE_STREAMS);
        // A turn to hold a connection: streams never take the connections unary calls
        // and the timeline need.
        // With a deadline, the answer (RESOURCE_EXHAUSTED and RetryInfo) must leave before
        // it: a tenth of what is left, up to 100 ms, is kept for that.
        let wait = crate::deadline::remaining().map_or(self.limits.max_duration, |left| {
            let margin = (left / 10).min(std::time::Duration::from_millis(100));
            left.saturating_sub(margin).min(self.limits.max_duration)
        });
        let slot = self.storage.stream_slot(wait).await?;
        let mut conn = StreamConnection::acquire(self.storage.pool()).await?;
        let mut tx = storage::begin_on(conn.conn()?).await?;
        match storage::claim_stream(&mut tx, &participation, stream_id, T::KIND).await? {
            StreamClaim::New => {}
            StreamClaim::Committed {
                participation_id: committed_for,
                kind,
                receipt,
                digest,
            } => {
                if committed_for != participation_id || kind != T::KIND {
                    return Err(Error::AlreadyExists(format!(
                        "stream id {stream_id} was used already for a stream of {kind} of \
                         participation {committed_for}"
                    )));
                }
                // The replay's items decide, read without a transaction or a connection.
                drop(tx);
                conn.ended_cleanly();
                drop(conn);
                drop(slot);
                return self.replay(&mut frames, receipt, digest).await;
            }
        }

        let mut copy = FeedCopy::begin::<T>(&mut tx).await?;
        let sink = Sink::Copy {
            copy: &mut copy,
            participation: &participation,
            stream_id,
            clock: &self.clock,
        };
        let pumped = pump_items(&mut frames, sink, self.limits);
        let outcome = tokio::select! {
            outcome = pumped => outcome,
            () = self.cancel_streams.cancelled() => Err(Error::ShuttingDown),
        };
        let received = match outcome {
            Ok(received) => received,
            Err(error) => {
                let aborted = copy.abort("the stream failed").await;
                drop(tx);
                if aborted {
                    conn.ended_cleanly();
                }
                return Err(error);
            }
        };
        let (stored, digest) = copy.finish().await?;
        if stored != received {
            return Err(Error::internal(anyhow::anyhow!(
                "COPY stored {stored} rows of {received}"
            )));
        }
        let committing = std::time::Instant::now();
        let committed_at =
            storage::finish_stream(&mut tx, &participation, stream_id, received, &digest).await?;
        tx.commit().await?;
        conn.ended_cleanly();
        metrics::histogram!(crate::metrics::STREAM_COMMIT_SECONDS)
            .record(committing.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::STREAM_ROWS).record(received as f64);
        metrics::counter!(crate::metrics::ITEMS_INGESTED, "kind" => T::KIND).increment(received);
        tracing::info!(%stream_id, items = received, kind = T::KIND, "stream committed");
        Ok(Receipt {
            stream_id,
            items_stored: received,
            committed_at,
            replayed: false,
        })
    }
}

impl IngestService {
    /// A stream whose id committed already: its items are read to the trailer (framed and
    /// limited as any stream's) and compared with the first commit's. The same items get
    /// the first receipt (`replayed`), other items ALREADY_EXISTS; nothing is stored.
    async fn replay<T, S>(
        &self,
        frames: &mut S,
        receipt: Receipt,
        committed: Option<Vec<u8>>,
    ) -> Result<Receipt, Error>
    where
        T: FeedTable,
        S: Stream<Item = Result<Frame<T>, Error>> + Unpin,
    {
        let mut digest = ItemDigest::new();
        let received = pump_items(frames, Sink::Digest(&mut digest), self.limits).await?;
        let stream_id = receipt.stream_id;
        match committed {
            Some(committed) if committed != digest.finish() => Err(Error::AlreadyExists(format!(
                "stream id {stream_id} committed already with other items ({} then, {received} \
                 now): a retry must send the same items; new items need a new stream_id",
                receipt.items_stored
            ))),
            _ => {
                tracing::info!(%stream_id, "replayed stream: returning the first receipt");
                Ok(receipt)
            }
        }
    }
}

/// Where a stream's items go: checked into the COPY of a new stream, or, for a replay,
/// only into a digest.
enum Sink<'a, 'c> {
    Copy {
        copy: &'a mut FeedCopy<'c>,
        participation: &'a Participation,
        stream_id: Uuid,
        clock: &'a ItemClock,
    },
    Digest(&'a mut ItemDigest),
}

/// Moves a stream's items into `sink` until its trailer, and checks the trailer; returns
/// the number of items. Memory stays bounded: items are encoded and sent as they come.
async fn pump_items<T, S>(
    frames: &mut S,
    mut sink: Sink<'_, '_>,
    limits: StreamLimits,
) -> Result<u64, Error>
where
    T: FeedTable,
    S: Stream<Item = Result<Frame<T>, Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + limits.max_duration;
    let too_long = || Error::ResourceExhausted {
        message: format!(
            "the stream was open longer than the server's limit of {} s, so nothing was \
             stored: send shorter streams",
            limits.max_duration.as_secs()
        ),
        retry_after: None,
    };
    let mut received: u64 = 0;
    let item_count = loop {
        let frame = tokio::time::timeout_at(deadline, frames.next())
            .await
            .map_err(|_| too_long())?;
        match frame.transpose()? {
            Some(Frame::Batch(items)) => {
                if received + items.len() as u64 > limits.max_items {
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
                for item in &items {
                    match &mut sink {
                        Sink::Copy {
                            copy,
                            participation,
                            stream_id,
                            clock,
                        } => {
                            check_clock(clock, now, item)
                                .and_then(|()| check_span(participation, item))
                                .map_err(|e| e.under(&format!("{}[{received}]", T::FIELD)))?;
                            copy.push(Uuid::now_v7(), participation, *stream_id, item)
                                .await?;
                        }
                        Sink::Digest(digest) => digest.add(item)?,
                    }
                    received += 1;
                }
            }
            Some(Frame::Trailer { item_count }) => break item_count,
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
    };
    if item_count != received {
        return Err(Error::InvalidArgument(vec![FieldViolation::new(
            "trailer.item_count",
            format!("the trailer counts {item_count} items but the stream carried {received}"),
        )]));
    }
    let end = tokio::time::timeout_at(deadline, frames.next())
        .await
        .map_err(|_| too_long())?;
    if end.transpose()?.is_some() {
        return Err(Error::invalid(
            "trailer",
            "the trailer must be the last message of a stream",
        ));
    }
    Ok(received)
}
