//! The use cases. Handlers call these with validated domain values; these apply the
//! rules that need stored state and drive storage. A client stream becomes exactly one
//! database transaction here.

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::{
    Event, FeedItem, Frame, ItemClock, Leave, NewEvent, NewParticipation, NewSentiment, NewUser,
    Participation, Receipt, Sentiment, Session, SessionType, StreamHeader, TimelineEntry, Timezone,
    Usage, User,
};
use crate::error::{Error, FieldViolation};
use crate::storage::{self, Batched, FeedCopy, FeedTable, Storage, StreamClaim};

/// Bounds on one client stream: its transaction stays open as long as the stream does.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub max_items: u64,
    pub max_duration: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct IngestService {
    storage: Storage,
    limits: StreamLimits,
    /// How far from the server's clock item times may lie.
    clock: ItemClock,
    /// Cancelled when the server stops waiting for open streams (end of the shutdown grace).
    cancel_streams: CancellationToken,
}

impl IngestService {
    pub fn new(
        storage: Storage,
        limits: StreamLimits,
        clock: ItemClock,
        cancel_streams: CancellationToken,
    ) -> Self {
        Self {
            storage,
            limits,
            clock,
            cancel_streams,
        }
    }

    /// Creates a user; with a request id, a retry returns the user it created.
    pub async fn create_user(
        &self,
        user: NewUser,
        request_id: Option<Uuid>,
    ) -> Result<User, Error> {
        let id = request_id.unwrap_or_else(Uuid::now_v7);
        if let Some(created) = self.storage.insert_user(id, &user).await? {
            return Ok(created);
        }
        let stored = self.get_user(id).await?;
        let same = stored.external_id == user.external_id
            && stored.country == user.country
            && stored.native_language == user.native_language
            && stored.region == user.region;
        same.then_some(stored).ok_or_else(|| reused(id, "user"))
    }

    pub async fn get_user(&self, id: Uuid) -> Result<User, Error> {
        self.storage
            .get_user(id)
            .await?
            .ok_or_else(|| Error::not_found("user", id))
    }

    /// Deletes the user and all that hangs under them; returns the participations deleted.
    pub async fn delete_user(&self, id: Uuid) -> Result<u64, Error> {
        self.storage
            .delete_user(id)
            .await?
            .ok_or_else(|| Error::not_found("user", id))
    }

    pub async fn upsert_timezone(&self, timezone: Timezone) -> Result<(Timezone, bool), Error> {
        self.storage.upsert_timezone(&timezone).await
    }

    pub async fn list_timezones(&self) -> Result<Vec<Timezone>, Error> {
        self.storage.list_timezones().await
    }

    pub async fn create_session(
        &self,
        session_type: SessionType,
        started_at: DateTime<Utc>,
        request_id: Option<Uuid>,
    ) -> Result<Session, Error> {
        let session = Session {
            id: request_id.unwrap_or_else(Uuid::now_v7),
            session_type,
            started_at,
            ended_at: None,
        };
        if let Some(created) = self.storage.insert_session(&session).await? {
            return Ok(created);
        }
        let stored = self.get_session(session.id).await?;
        let same = stored.session_type == session_type && stored.started_at == started_at;
        same.then_some(stored)
            .ok_or_else(|| reused(session.id, "session"))
    }

    pub async fn get_session(&self, id: Uuid) -> Result<Session, Error> {
        self.storage
            .get_session(id)
            .await?
            .ok_or_else(|| Error::not_found("session", id))
    }

    pub async fn end_session(&self, id: Uuid, ended_at: DateTime<Utc>) -> Result<Session, Error> {
        let session = self.get_session(id).await?;
        if let Some(end) = session.ended_at {
            return Err(Error::FailedPrecondition(format!(
                "session {id} ended already, at {end}"
            )));
        }
        if ended_at < session.started_at {
            return Err(Error::invalid(
                "ended_at",
                format!(
                    "must not be before the session started ({})",
                    session.started_at
                ),
            ));
        }
        match self.storage.end_session(id, ended_at).await? {
            Some(session) => Ok(session),
            // Ended (or deleted) by a concurrent request between the read and the update.
            None => Err(Error::FailedPrecondition(format!(
                "session {id} ended already"
            ))),
        }
    }

    pub async fn join_session(
        &self,
        join: NewParticipation,
        request_id: Option<Uuid>,
    ) -> Result<Participation, Error> {
        let session = self.get_session(join.session_id).await?;
        if let Some(why) = session.refuses_connection_at(join.connected_at) {
            return Err(Error::FailedPrecondition(why));
        }
        let id = request_id.unwrap_or_else(Uuid::now_v7);
        if let Some(created) = self.storage.insert_participation(id, &join).await? {
            return Ok(created);
        }
        let stored = self.get_participation(id).await?;
        let same = stored.user_id == join.user_id
            && stored.session_id == join.session_id
            && stored.timezone_code == join.timezone_code
            && stored.connected_at == join.connected_at;
        same.then_some(stored)
            .ok_or_else(|| reused(id, "participation"))
    }

    pub async fn get_participation(&self, id: Uuid) -> Result<Participation, Error> {
        self.storage
            .get_participation(id)
            .await?
            .ok_or_else(|| Error::not_found("participation", id))
    }

    pub async fn leave_session(&self, leave: Leave) -> Result<Participation, Error> {
        let participation = self.get_participation(leave.participation_id).await?;
        if let Some((field, why)) = participation.refuses_leave(&leave) {
            return Err(if field.is_empty() {
                Error::FailedPrecondition(why)
            } else {
                Error::invalid(field, why)
            });
        }
        let usage = Usage {
            talked_time: leave.talked_time,
            microphone_used: leave.microphone_used,
            speaker_used: leave.speaker_used,
        };
        self.storage
            .leave_participation(&participation, leave.disconnected_at, &usage)
            .await?
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "participation {} was left already",
                    participation.id
                ))
            })
    }

    pub async fn record_sentiment(
        &self,
        participation_id: Uuid,
        sentiment: NewSentiment,
        request_id: Option<Uuid>,
    ) -> Result<Sentiment, Error> {
        let id = self
            .record_one(participation_id, "sentiment", &sentiment, request_id)
            .await?;
        Ok(Sentiment {
            id,
            participation_id,
            sentiment,
        })
    }

    pub async fn record_event(
        &self,
        participation_id: Uuid,
        event: NewEvent,
        request_id: Option<Uuid>,
    ) -> Result<Event, Error> {
        let id = self
            .record_one(participation_id, "event", &event, request_id)
            .await?;
        Ok(Event {
            id,
            participation_id,
            event,
        })
    }

    async fn record_one<T: Batched>(
        &self,
        participation_id: Uuid,
        field: &str,
        item: &T,
        request_id: Option<Uuid>,
    ) -> Result<Uuid, Error> {
        check_clock(&self.clock, Utc::now(), item).map_err(|e| e.under(field))?;
        let id = request_id.unwrap_or_else(Uuid::now_v7);
        // The happy path is one statement; only a refusal costs a second look.
        for _ in 0..2 {
            if self
                .storage
                .insert_feed_item(participation_id, id, item)
                .await?
            {
                metrics::counter!(crate::metrics::ITEMS_INGESTED, "kind" => T::KIND).increment(1);
                return Ok(id);
            }
            let participation = self.get_participation(participation_id).await?;
            check_span(&participation, item).map_err(|e| e.under(field))?;
            if request_id.is_some() {
                // A retry of a call that stored this id already?
                if let Some((stored_for, stored)) =
                    self.storage.get_feed_item::<T>(&participation, id).await?
                {
                    return if stored_for == participation_id && stored == *item {
                        Ok(id)
                    } else {
                        Err(reused(id, field))
                    };
                }
            }
            // Neither missing nor out of span now: it changed between the two statements.
        }
        Err(Error::FailedPrecondition(format!(
            "participation {participation_id} is changing concurrently; retry"
        )))
    }

    pub async fn timeline(
        &self,
        participation_id: Uuid,
    ) -> Result<mpsc::Receiver<Result<TimelineEntry, Error>>, Error> {
        let participation = self.get_participation(participation_id).await?;
        Ok(self.storage.timeline(&participation))
    }

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

        metrics::gauge!(crate::metrics::ACTIVE_STREAMS).increment(1.0);
        let _active = ActiveStream;
        let mut tx = self.storage.begin().await?;
        match storage::claim_stream(&mut tx, &participation, stream_id, T::KIND).await? {
            StreamClaim::New => {}
            StreamClaim::Committed {
                participation_id: committed_for,
                kind,
                receipt,
            } => {
                if committed_for != participation_id || kind != T::KIND {
                    return Err(Error::AlreadyExists(format!(
                        "stream id {stream_id} was used already for a stream of {kind} of \
                         participation {committed_for}"
                    )));
                }
                tracing::info!(%stream_id, "replayed stream: returning the first receipt");
                return Ok(receipt);
            }
        }

        let mut copy = FeedCopy::begin::<T>(&mut tx).await?;
        let pumped = pump_items(
            &mut frames,
            &mut copy,
            &participation,
            stream_id,
            self.limits,
            &self.clock,
        );
        let outcome = tokio::select! {
            outcome = pumped => outcome,
            () = self.cancel_streams.cancelled() => Err(Error::ShuttingDown),
        };
        let received = match outcome {
            Ok(received) => received,
            Err(error) => {
                copy.abort("the stream failed").await;
                return Err(error);
            }
        };
        let stored = copy.finish().await?;
        if stored != received {
            return Err(Error::internal(anyhow::anyhow!(
                "COPY stored {stored} rows of {received}"
            )));
        }
        let committing = std::time::Instant::now();
        let committed_at =
            storage::finish_stream(&mut tx, &participation, stream_id, received).await?;
        tx.commit().await?;
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

/// Counts a stream as active until dropped, however its call ends.
struct ActiveStream;

impl Drop for ActiveStream {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::ACTIVE_STREAMS).decrement(1.0);
    }
}

fn reused(request_id: Uuid, what: &str) -> Error {
    Error::AlreadyExists(format!(
        "request_id {request_id} was used already for a different {what}"
    ))
}

/// Moves a stream's items into `copy` until its trailer, and checks the trailer; returns
/// the number of items. Memory stays bounded: items are encoded and sent as they come.
async fn pump_items<T, S>(
    frames: &mut S,
    copy: &mut FeedCopy<'_>,
    participation: &Participation,
    stream_id: Uuid,
    limits: StreamLimits,
    clock: &ItemClock,
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
                    check_clock(clock, now, item)
                        .and_then(|()| check_span(participation, item))
                        .map_err(|e| e.under(&format!("{}[{received}]", T::FIELD)))?;
                    copy.push(Uuid::now_v7(), participation, stream_id, item)
                        .await?;
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

/// Fails unless `item`'s times lie in the window `clock` allows around `now`, naming the
/// item's offending field.
fn check_clock<T: FeedItem>(
    clock: &ItemClock,
    now: DateTime<Utc>,
    item: &T,
) -> Result<(), FieldViolation> {
    let (start, end) = item.span();
    if let Some(why) = clock.refuses(now, start) {
        return Err(FieldViolation::new(T::START_FIELD, why));
    }
    match clock.refuses(now, end) {
        Some(why) if end != start => Err(FieldViolation::new(T::END_FIELD, why)),
        _ => Ok(()),
    }
}

/// Fails unless `item` lies inside `participation`, naming the item's offending field.
fn check_span<T: FeedItem>(participation: &Participation, item: &T) -> Result<(), FieldViolation> {
    let (start, end) = item.span();
    match participation.refuses_span(start, end) {
        None => Ok(()),
        Some((which, why)) => {
            let name = if which == "start" {
                T::START_FIELD
            } else {
                T::END_FIELD
            };
            Err(FieldViolation::new(name, why))
        }
    }
}
