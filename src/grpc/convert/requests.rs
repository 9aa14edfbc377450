//! Protobuf requests -> domain values (and named commands), with every problem as a
//! field violation naming its field.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Violated;
use super::enums::{event_kind, label, session_type};
use super::scalars::{duration, request_id, signed_duration_required, timestamp, uuid};
use crate::domain::{
    CountryCode, ExternalId, LanguageTag, Leave, NewEvent, NewParticipation, NewSentiment, NewUser,
    SessionType, Timezone, TimezoneCode,
};
use crate::error::{FieldViolation, Violations};
use crate::proto;

/// CreateUser, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateUser {
    pub user: NewUser,
    pub request_id: Option<Uuid>,
}

/// CreateSession, parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CreateSession {
    pub session_type: SessionType,
    pub started_at: DateTime<Utc>,
    pub request_id: Option<Uuid>,
}

/// EndSession, parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndSession {
    pub session_id: Uuid,
    pub ended_at: DateTime<Utc>,
}

/// JoinSession, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinSession {
    pub participation: NewParticipation,
    pub request_id: Option<Uuid>,
}

/// RecordSentiment, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSentiment {
    pub participation_id: Uuid,
    pub sentiment: NewSentiment,
    pub request_id: Option<Uuid>,
}

/// RecordEvent, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordEvent {
    pub participation_id: Uuid,
    pub event: NewEvent,
    pub request_id: Option<Uuid>,
}

pub fn new_user(req: proto::CreateUserRequest) -> Violated<CreateUser> {
    let mut v = Violations::new();
    let request = v.check("request_id", request_id(&req.request_id));
    let external_id = v.check("external_id", ExternalId::parse(&req.external_id));
    let country = v.check("country", CountryCode::parse(&req.country));
    let native_language = v.check("native_language", LanguageTag::parse(&req.native_language));
    let region = v.check("region", NewUser::parse_region(&req.region));
    let user = match (external_id, country, native_language, region) {
        (Some(external_id), Some(country), Some(native_language), Some(region)) => Some(NewUser {
            external_id,
            country,
            native_language,
            region,
        }),
        _ => None,
    };
    v.finish(
        user.zip(request)
            .map(|(user, request_id)| CreateUser { user, request_id }),
    )
}

pub fn timezone(value: Option<proto::Timezone>) -> Violated<Timezone> {
    let Some(tz) = value else {
        return Err(vec![FieldViolation::new("timezone", "is required")]);
    };
    let mut v = Violations::new();
    let code = v.check("timezone.code", TimezoneCode::parse(&tz.code));
    let offset = v.check(
        "timezone.utc_offset",
        signed_duration_required(tz.utc_offset.as_ref())
            .and_then(|d| Timezone::parse_offset(d.num_seconds()).map(|s| (s, d)))
            .and_then(|(s, d)| {
                if d.subsec_nanos() == 0 {
                    Ok(s)
                } else {
                    Err("must be a whole number of minutes".to_owned())
                }
            }),
    );
    let timezone = code.zip(offset).map(|(code, utc_offset_seconds)| Timezone {
        code,
        utc_offset_seconds,
    });
    v.finish(timezone)
}

pub fn create_session(req: proto::CreateSessionRequest) -> Violated<CreateSession> {
    let mut v = Violations::new();
    let session_type = v.check("session_type", session_type(req.session_type));
    let started_at = v.check("started_at", timestamp(req.started_at.as_ref()));
    let request = v.check("request_id", request_id(&req.request_id));
    let session = match (session_type, started_at, request) {
        (Some(session_type), Some(started_at), Some(request_id)) => Some(CreateSession {
            session_type,
            started_at,
            request_id,
        }),
        _ => None,
    };
    v.finish(session)
}

pub fn end_session(req: proto::EndSessionRequest) -> Violated<EndSession> {
    let mut v = Violations::new();
    let id = v.check("session_id", uuid(&req.session_id));
    let ended_at = v.check("ended_at", timestamp(req.ended_at.as_ref()));
    v.finish(id.zip(ended_at).map(|(session_id, ended_at)| EndSession {
        session_id,
        ended_at,
    }))
}

pub fn record_sentiment(req: proto::RecordSentimentRequest) -> Violated<RecordSentiment> {
    let mut v = Violations::new();
    let id = v.check("participation_id", uuid(&req.participation_id));
    let request = v.check("request_id", request_id(&req.request_id));
    let sentiment = match &req.sentiment {
        Some(s) => v.take("sentiment", new_sentiment(s)),
        None => {
            v.add("sentiment", "is required");
            None
        }
    };
    v.finish(
        id.zip(sentiment)
            .zip(request)
            .map(
                |((participation_id, sentiment), request_id)| RecordSentiment {
                    participation_id,
                    sentiment,
                    request_id,
                },
            ),
    )
}

pub fn record_event(req: proto::RecordEventRequest) -> Violated<RecordEvent> {
    let mut v = Violations::new();
    let id = v.check("participation_id", uuid(&req.participation_id));
    let request = v.check("request_id", request_id(&req.request_id));
    let event = match req.event {
        Some(e) => v.take("event", new_event(e)),
        None => {
            v.add("event", "is required");
            None
        }
    };
    v.finish(
        id.zip(event)
            .zip(request)
            .map(|((participation_id, event), request_id)| RecordEvent {
                participation_id,
                event,
                request_id,
            }),
    )
}

pub fn join(req: proto::JoinSessionRequest) -> Violated<JoinSession> {
    let mut v = Violations::new();
    let request = v.check("request_id", request_id(&req.request_id));
    let user_id = v.check("user_id", uuid(&req.user_id));
    let session_id = v.check("session_id", uuid(&req.session_id));
    let timezone_code = v.check("timezone_code", TimezoneCode::parse(&req.timezone_code));
    let connected_at = v.check("connected_at", timestamp(req.connected_at.as_ref()));
    let join = match (user_id, session_id, timezone_code, connected_at) {
        (Some(user_id), Some(session_id), Some(timezone_code), Some(connected_at)) => {
            Some(NewParticipation {
                user_id,
                session_id,
                timezone_code,
                connected_at,
            })
        }
        _ => None,
    };
    v.finish(
        join.zip(request)
            .map(|(participation, request_id)| JoinSession {
                participation,
                request_id,
            }),
    )
}

pub fn leave(req: proto::LeaveSessionRequest) -> Violated<Leave> {
    let mut v = Violations::new();
    let participation_id = v.check("participation_id", uuid(&req.participation_id));
    let disconnected_at = v.check("disconnected_at", timestamp(req.disconnected_at.as_ref()));
    let talked_time = v.check("talked_time", duration(req.talked_time.as_ref()));
    let leave = match (participation_id, disconnected_at, talked_time) {
        (Some(participation_id), Some(disconnected_at), Some(talked_time)) => Some(Leave {
            participation_id,
            disconnected_at,
            talked_time,
            microphone_used: req.microphone_used,
            speaker_used: req.speaker_used,
        }),
        _ => None,
    };
    v.finish(leave)
}

pub fn new_sentiment(s: &proto::NewSentiment) -> Violated<NewSentiment> {
    let mut v = Violations::new();
    let started_at = v.check("started_at", timestamp(s.started_at.as_ref()));
    let ended_at = v.check("ended_at", timestamp(s.ended_at.as_ref()));
    let label = v.check("label", label(s.label));
    match (started_at, ended_at, label) {
        (Some(started_at), Some(ended_at), Some(label)) if v.is_empty() => {
            NewSentiment::parse(started_at, ended_at, label, s.score)
        }
        _ => {
            // Report the score too, by the domain's one rule for it.
            v.check("score", NewSentiment::parse_score(s.score));
            Err(v.into_vec())
        }
    }
}

pub fn new_event(e: proto::NewEvent) -> Violated<NewEvent> {
    let mut v = Violations::new();
    let occurred_at = v.check("occurred_at", timestamp(e.occurred_at.as_ref()));
    let kind = v.check("kind", event_kind(e.kind));
    let attributes: BTreeMap<String, String> = e.attributes.into_iter().collect();
    match (occurred_at, kind) {
        (Some(occurred_at), Some(kind)) => NewEvent::parse(occurred_at, kind, attributes),
        _ => Err(v.into_vec()),
    }
}
