//! The use cases. Handlers call these with validated domain values; these apply the
//! rules that need stored state and drive storage. A client stream becomes exactly one
//! database transaction here.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod items;
mod live;
mod settle;
mod streams;

use items::{check_clock, check_span};
use settle::settled;

use crate::domain::{
    ItemClock, Leave, LeaveRefusal, NewParticipation, NewUser, Participation, Session,
    SessionEndRefusal, SessionType, TimelineEntry, TimelineRange, Timezone, Usage, User,
};
use crate::error::{Error, RETRY_AFTER_READ, RETRY_SAME_ID, RETRY_WITHOUT_ID};
use crate::storage::{Batched, Leaving, Spooler, Storage};

/// Bounds on one client stream (its bytes are bounded by the spool, [`SpoolSettings`]).
///
/// [`SpoolSettings`]: crate::storage::SpoolSettings
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub max_items: u64,
    pub max_duration: std::time::Duration,
    /// How long the client of a stream being written may stay silent before the stream
    /// gives its connection back.
    pub writer_idle: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct IngestService {
    storage: Storage,
    /// Where streams keep their items until they are written.
    spooler: Arc<Spooler>,
    limits: StreamLimits,
    /// How far from the server's clock item times may lie.
    clock: ItemClock,
    /// Cancelled when the server stops waiting for open streams (end of the shutdown grace).
    cancel_streams: CancellationToken,
}

impl IngestService {
    pub fn new(
        storage: Storage,
        spooler: Arc<Spooler>,
        limits: StreamLimits,
        clock: ItemClock,
        cancel_streams: CancellationToken,
    ) -> Self {
        Self {
            storage,
            spooler,
            limits,
            clock,
            cancel_streams,
        }
    }

    /// Creates a user; with a request id, a retry returns the user it created.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn create_user(
        &self,
        user: NewUser,
        request_id: Option<Uuid>,
    ) -> Result<User, Error> {
        let id = request_id.unwrap_or_else(Uuid::now_v7);
        settled(retry_hint(request_id), |_| self.create_user_as(id, &user)).await
    }

    async fn create_user_as(&self, id: Uuid, user: &NewUser) -> Result<User, Error> {
        if let Some(created) = self.storage.insert_user(id, user).await? {
            return Ok(created);
        }
        let stored = self.get_user(id).await?;
        let same = stored.external_id == user.external_id
            && stored.country == user.country
            && stored.native_language == user.native_language
            && stored.region == user.region;
        same.then_some(stored).ok_or_else(|| reused(id, "user"))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn get_user(&self, id: Uuid) -> Result<User, Error> {
        self.storage
            .get_user(id)
            .await?
            .ok_or_else(|| Error::not_found("user", id))
    }

    /// Deletes the user and all that hangs under them; returns the participations deleted.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn delete_user(&self, id: Uuid) -> Result<u64, Error> {
        // What the first attempt counted: if its commit's answer is lost and the user is
        // gone afterwards, that attempt deleted them.
        let first_counted = std::sync::Mutex::new(None);
        let first_counted = &first_counted;
        settled(RETRY_AFTER_READ, |again| async move {
            let mut counted = None;
            let deleted = self.storage.delete_user(id, &mut counted).await;
            let mut first = first_counted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !again {
                *first = counted;
            }
            match (deleted?, *first) {
                (Some(participations), _) => Ok(participations),
                (None, Some(participations)) if again => Ok(participations),
                (None, _) => Err(Error::not_found("user", id)),
            }
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn upsert_timezone(&self, timezone: Timezone) -> Result<(Timezone, bool), Error> {
        settled(RETRY_SAME_ID, |_| self.storage.upsert_timezone(&timezone)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn list_timezones(&self) -> Result<Vec<Timezone>, Error> {
        self.storage.list_timezones().await
    }

    #[tracing::instrument(level = "debug", skip_all)]
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
            last_connected_at: None,
        };
        settled(retry_hint(request_id), |_| async {
            if let Some(created) = self.storage.insert_session(&session).await? {
                return Ok(created);
            }
            let stored = self.get_session(session.id).await?;
            let same = stored.session_type == session_type && stored.started_at == started_at;
            same.then_some(stored)
                .ok_or_else(|| reused(session.id, "session"))
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn get_session(&self, id: Uuid) -> Result<Session, Error> {
        self.storage
            .get_session(id)
            .await?
            .ok_or_else(|| Error::not_found("session", id))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn end_session(&self, id: Uuid, ended_at: DateTime<Utc>) -> Result<Session, Error> {
        settled(RETRY_AFTER_READ, |again| {
            self.end_session_at(id, ended_at, again)
        })
        .await
    }

    /// Ends the session; `again`: an earlier attempt may have ended it at this time.
    async fn end_session_at(
        &self,
        id: Uuid,
        ended_at: DateTime<Utc>,
        again: bool,
    ) -> Result<Session, Error> {
        let session = self.get_session(id).await?;
        if again && session.ended_at == Some(ended_at) {
            return Ok(session);
        }
        match session.refuses_end_at(ended_at) {
            None => {}
            Some(SessionEndRefusal::BeforeStart(why)) => {
                return Err(Error::invalid("ended_at", why));
            }
            Some(SessionEndRefusal::Ended(why)) => return Err(Error::FailedPrecondition(why)),
        }
        match self.storage.end_session(id, ended_at).await? {
            Some(session) => Ok(session),
            // Ended (or deleted) by a concurrent request between the read and the update.
            None => Err(Error::FailedPrecondition(format!(
                "session {id} ended already"
            ))),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn join_session(
        &self,
        join: NewParticipation,
        request_id: Option<Uuid>,
    ) -> Result<Participation, Error> {
        let id = request_id.unwrap_or_else(Uuid::now_v7);
        settled(retry_hint(request_id), |_| self.join_session_as(id, &join)).await
    }

    async fn join_session_as(
        &self,
        id: Uuid,
        join: &NewParticipation,
    ) -> Result<Participation, Error> {
        // The happy path is one statement (it reads the session too); only a refusal costs
        // a second look.
        if let Some(created) = self.storage.insert_participation(id, join).await? {
            return Ok(created);
        }
        let session = self.get_session(join.session_id).await?;
        if let Some(why) = session.refuses_connection_at(join.connected_at) {
            return Err(Error::FailedPrecondition(why));
        }
        // The session takes the join, so the id is taken: a retry, or a reuse.
        let Some(stored) = self.storage.get_participation(id).await? else {
            return Err(Error::FailedPrecondition(format!(
                "session {} is changing concurrently; retry",
                join.session_id
            )));
        };
        let same = stored.user_id == join.user_id
            && stored.session_id == join.session_id
            && stored.timezone_code == join.timezone_code
            && stored.connected_at == join.connected_at;
        same.then_some(stored)
            .ok_or_else(|| reused(id, "participation"))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn get_participation(&self, id: Uuid) -> Result<Participation, Error> {
        self.storage
            .get_participation(id)
            .await?
            .ok_or_else(|| Error::not_found("participation", id))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn leave_session(&self, leave: Leave) -> Result<Participation, Error> {
        settled(RETRY_AFTER_READ, |again| {
            self.leave_session_as(&leave, again)
        })
        .await
    }

    /// Closes the participation; `again`: an earlier attempt may have closed it so.
    async fn leave_session_as(&self, leave: &Leave, again: bool) -> Result<Participation, Error> {
        let participation = self.get_participation(leave.participation_id).await?;
        let usage = Usage {
            talked_time: leave.talked_time,
            microphone_used: leave.microphone_used,
            speaker_used: leave.speaker_used,
        };
        if again
            && participation.disconnected_at == Some(leave.disconnected_at)
            && participation.usage.as_ref() == Some(&usage)
        {
            return Ok(participation);
        }
        match participation.refuses_leave(leave) {
            None => {}
            Some(LeaveRefusal::AlreadyLeft(why)) => return Err(Error::FailedPrecondition(why)),
            Some(LeaveRefusal::Field(field, why)) => return Err(Error::invalid(field, why)),
        }
        match self
            .storage
            .leave_participation(&participation, leave.disconnected_at, &usage)
            .await?
        {
            Leaving::Left(left) => Ok(left),
            Leaving::Closed => Err(Error::FailedPrecondition(format!(
                "participation {} was left already",
                participation.id
            ))),
            Leaving::ItemsUntil(last) => Err(Error::invalid(
                "disconnected_at",
                format!("must not be before the end of the items stored for it ({last})"),
            )),
        }
    }

    /// Records one sentiment or event outside any stream; with a request id, a retry
    /// returns what the first call stored.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn record<T: Batched>(
        &self,
        participation_id: Uuid,
        item: T,
        request_id: Option<Uuid>,
    ) -> Result<T::Stored, Error> {
        let id = self
            .record_one(participation_id, T::NAME, &item, request_id)
            .await?;
        Ok(item.into_stored(id, participation_id))
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
        let retry = retry_hint(request_id);
        for _ in 0..2 {
            let stored = settled(retry, |_| {
                self.storage
                    .insert_feed_item(participation_id, id, request_id.is_some(), item)
            })
            .await?;
            if stored {
                metrics::counter!(crate::metrics::ITEMS_INGESTED, "kind" => T::KIND).increment(1);
                return Ok(id);
            }
            let participation = self.get_participation(participation_id).await?;
            check_span(&participation, item).map_err(|e| e.under(field))?;
            if request_id.is_some() {
                // A retry of a call that stored this id already, or a reuse?
                match self.storage.feed_claim::<T>(&participation, id).await? {
                    Some((claimed_for, Some(stored))) => {
                        return if claimed_for == participation_id && stored == *item {
                            Ok(id)
                        } else {
                            Err(reused(id, field))
                        };
                    }
                    // Claimed, and its item gone since (the retention dropped its partition).
                    Some((_, None)) => {
                        return Err(Error::AlreadyExists(format!(
                            "request_id {id} was used already, for a {field} no longer stored \
                             (older than the retention)"
                        )));
                    }
                    None => {}
                }
            } else if let Some(stored) = self
                .storage
                .feed_item::<T>(&participation, id, item)
                .await?
            {
                // The server's own id, stored: by an attempt whose answer was lost.
                return if stored == *item {
                    Ok(id)
                } else {
                    Err(reused(id, field))
                };
            }
            // Neither missing nor out of span now: it changed between the two statements.
        }
        Err(Error::FailedPrecondition(format!(
            "participation {participation_id} is changing concurrently; retry"
        )))
    }

    /// The entries of `range` in a participation's timeline, in chunks as they are read.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn timeline(
        &self,
        participation_id: Uuid,
        range: TimelineRange,
    ) -> Result<mpsc::Receiver<Result<Vec<TimelineEntry>, Error>>, Error> {
        let participation = self.get_participation(participation_id).await?;
        Ok(self.storage.timeline(&participation, range))
    }
}

/// How a call whose outcome is unknown can be retried.
fn retry_hint(request_id: Option<Uuid>) -> &'static str {
    match request_id {
        Some(_) => RETRY_SAME_ID,
        None => RETRY_WITHOUT_ID,
    }
}

fn reused(request_id: Uuid, what: &str) -> Error {
    Error::AlreadyExists(format!(
        "request_id {request_id} was used already for a different {what}"
    ))
}
