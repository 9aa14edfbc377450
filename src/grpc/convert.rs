//! Protobuf <-> domain conversion. Requests are parsed here, once, into domain values;
//! every problem becomes a field violation naming the field.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::domain::{
    self, EventKind, Frame, Leave, NewEvent, NewParticipation, NewSentiment, NewUser, Receipt,
    SentimentLabel, Session, SessionType, StreamHeader, TimelineEntry, Timezone, User,
};
use crate::error::{Error, FieldViolation, Violations};
use crate::proto;

type Violated<T> = Result<T, Vec<FieldViolation>>;

/// The protobuf Timestamp range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

/// A required Timestamp, truncated to the microseconds PostgreSQL stores.
pub fn timestamp(value: Option<&prost_types::Timestamp>) -> Result<DateTime<Utc>, String> {
    let ts = value.ok_or_else(|| "is required".to_owned())?;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds) {
        return Err("must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z".to_owned());
    }
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| format!("has nanos {} outside 0..=999999999", ts.nanos))?;
    DateTime::from_timestamp(ts.seconds, nanos - nanos % 1_000)
        .ok_or_else(|| "is not a valid time".to_owned())
}

pub fn to_timestamp(value: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: value.timestamp(),
        nanos: i32::try_from(value.timestamp_subsec_nanos()).unwrap_or_default(),
    }
}

/// A required Duration, truncated to microseconds. Negative durations are refused.
pub fn duration(value: Option<&prost_types::Duration>) -> Result<TimeDelta, String> {
    let d = value.ok_or_else(|| "is required".to_owned())?;
    let delta = signed_duration(d)?;
    if delta < TimeDelta::zero() {
        return Err("must not be negative".to_owned());
    }
    Ok(delta)
}

fn signed_duration(d: &prost_types::Duration) -> Result<TimeDelta, String> {
    const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
    if d.seconds.abs() > MAX_DURATION_SECONDS || d.nanos.abs() >= 1_000_000_000 {
        return Err("is out of the protobuf Duration range".to_owned());
    }
    if (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err("has seconds and nanos of different signs".to_owned());
    }
    let micros = i64::from(d.nanos / 1_000);
    TimeDelta::try_seconds(d.seconds)
        .and_then(|s| s.checked_add(&TimeDelta::microseconds(micros)))
        .ok_or_else(|| "is out of range".to_owned())
}

pub fn to_duration(value: TimeDelta) -> prost_types::Duration {
    let seconds = value.num_seconds();
    let nanos = (value - TimeDelta::seconds(seconds))
        .num_nanoseconds()
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or_default();
    prost_types::Duration { seconds, nanos }
}

pub fn uuid(value: &str) -> Result<Uuid, String> {
    if value.is_empty() {
        return Err("is required".to_owned());
    }
    Uuid::try_parse(value).map_err(|_| format!("must be a UUID, got {:?}", truncated(value)))
}

fn truncated(value: &str) -> String {
    value.chars().take(64).collect()
}

/// Parses one id field of a request.
pub fn id_field(field: &str, value: &str) -> Result<Uuid, Error> {
    uuid(value).map_err(|why| Error::invalid(field, why))
}

fn enum_value<P, D>(
    raw: i32,
    decode: impl Fn(i32) -> Option<P>,
    map: impl Fn(P) -> Option<D>,
    unspecified: P,
) -> Result<D, String>
where
    P: PartialEq + Copy + std::fmt::Debug,
{
    match decode(raw) {
        None => Err(format!("has unknown value {raw}")),
        Some(p) if p == unspecified => Err(format!("is required (got {unspecified:?})")),
        Some(p) => map(p).ok_or_else(|| format!("has unsupported value {p:?}")),
    }
}

pub fn session_type(raw: i32) -> Result<SessionType, String> {
    use proto::SessionType as P;
    enum_value(
        raw,
        |v| P::try_from(v).ok(),
        |p| match p {
            P::Call => Some(SessionType::Call),
            P::Meeting => Some(SessionType::Meeting),
            P::Webinar => Some(SessionType::Webinar),
            P::Unspecified => None,
        },
        P::Unspecified,
    )
}

fn session_type_to_proto(value: SessionType) -> proto::SessionType {
    match value {
        SessionType::Call => proto::SessionType::Call,
        SessionType::Meeting => proto::SessionType::Meeting,
        SessionType::Webinar => proto::SessionType::Webinar,
    }
}

fn label(raw: i32) -> Result<SentimentLabel, String> {
    use proto::SentimentLabel as P;
    enum_value(
        raw,
        |v| P::try_from(v).ok(),
        |p| match p {
            P::Positive => Some(SentimentLabel::Positive),
            P::Neutral => Some(SentimentLabel::Neutral),
            P::Negative => Some(SentimentLabel::Negative),
            P::Unspecified => None,
        },
        P::Unspecified,
    )
}

fn label_to_proto(value: SentimentLabel) -> proto::SentimentLabel {
    match value {
        SentimentLabel::Positive => proto::SentimentLabel::Positive,
        SentimentLabel::Neutral => proto::SentimentLabel::Neutral,
        SentimentLabel::Negative => proto::SentimentLabel::Negative,
    }
}

fn event_kind(raw: i32) -> Result<EventKind, String> {
    use proto::EventKind as P;
    enum_value(
        raw,
        |v| P::try_from(v).ok(),
        |p| {
            Some(match p {
                P::Unspecified => return None,
                P::Connected => EventKind::Connected,
                P::Disconnected => EventKind::Disconnected,
                P::MicrophoneMuted => EventKind::MicrophoneMuted,
                P::MicrophoneUnmuted => EventKind::MicrophoneUnmuted,
                P::SpeakerOn => EventKind::SpeakerOn,
                P::SpeakerOff => EventKind::SpeakerOff,
                P::TalkStarted => EventKind::TalkStarted,
                P::TalkStopped => EventKind::TalkStopped,
                P::NoiseCancellationOn => EventKind::NoiseCancellationOn,
                P::NoiseCancellationOff => EventKind::NoiseCancellationOff,
                P::ScreenShareStarted => EventKind::ScreenShareStarted,
                P::ScreenShareStopped => EventKind::ScreenShareStopped,
            })
        },
        P::Unspecified,
    )
}

fn event_kind_to_proto(value: EventKind) -> proto::EventKind {
    use proto::EventKind as P;
    match value {
        EventKind::Connected => P::Connected,
        EventKind::Disconnected => P::Disconnected,
        EventKind::MicrophoneMuted => P::MicrophoneMuted,
        EventKind::MicrophoneUnmuted => P::MicrophoneUnmuted,
        EventKind::SpeakerOn => P::SpeakerOn,
        EventKind::SpeakerOff => P::SpeakerOff,
        EventKind::TalkStarted => P::TalkStarted,
        EventKind::TalkStopped => P::TalkStopped,
        EventKind::NoiseCancellationOn => P::NoiseCancellationOn,
        EventKind::NoiseCancellationOff => P::NoiseCancellationOff,
        EventKind::ScreenShareStarted => P::ScreenShareStarted,
        EventKind::ScreenShareStopped => P::ScreenShareStopped,
    }
}

/// An optional request id: empty means none.
fn request_id(value: &str) -> Result<Option<Uuid>, String> {
    if value.is_empty() {
        Ok(None)
    } else {
        uuid(value).map(Some)
    }
}

pub fn new_user(req: proto::CreateUserRequest) -> Violated<(NewUser, Option<Uuid>)> {
    let mut v = Violations::new();
    let request = v.check("request_id", request_id(&req.request_id));
    let external_id = v.check("external_id", NewUser::parse_external_id(&req.external_id));
    let country = v.check("country", NewUser::parse_country(&req.country));
    let native_language = v.check(
        "native_language",
        NewUser::parse_language(&req.native_language),
    );
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
    v.finish(user.zip(request))
}

pub fn user_to_proto(user: User) -> proto::User {
    proto::User {
        id: user.id.to_string(),
        external_id: user.external_id,
        country: user.country.unwrap_or_default(),
        native_language: user.native_language.unwrap_or_default(),
        region: user.region.unwrap_or_default(),
        created_at: Some(to_timestamp(user.created_at)),
    }
}

pub fn timezone(value: Option<proto::Timezone>) -> Violated<Timezone> {
    let Some(tz) = value else {
        return Err(vec![FieldViolation::new("timezone", "is required")]);
    };
    let mut v = Violations::new();
    let code = v.check("timezone.code", Timezone::parse_code(&tz.code));
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

fn signed_duration_required(value: Option<&prost_types::Duration>) -> Result<TimeDelta, String> {
    signed_duration(value.ok_or_else(|| "is required".to_owned())?)
}

pub fn timezone_to_proto(tz: Timezone) -> proto::Timezone {
    proto::Timezone {
        code: tz.code,
        utc_offset: Some(to_duration(TimeDelta::seconds(i64::from(
            tz.utc_offset_seconds,
        )))),
    }
}

pub fn session_to_proto(session: Session) -> proto::Session {
    proto::Session {
        id: session.id.to_string(),
        session_type: session_type_to_proto(session.session_type) as i32,
        started_at: Some(to_timestamp(session.started_at)),
        ended_at: session.ended_at.map(to_timestamp),
        duration: session.duration().map(to_duration),
    }
}

pub fn create_session(
    req: proto::CreateSessionRequest,
) -> Violated<(SessionType, DateTime<Utc>, Option<Uuid>)> {
    let mut v = Violations::new();
    let session_type = v.check("session_type", session_type(req.session_type));
    let started_at = v.check("started_at", timestamp(req.started_at.as_ref()));
    let request = v.check("request_id", request_id(&req.request_id));
    let session = match (session_type, started_at, request) {
        (Some(t), Some(at), Some(request)) => Some((t, at, request)),
        _ => None,
    };
    v.finish(session)
}

pub fn end_session(req: proto::EndSessionRequest) -> Violated<(Uuid, DateTime<Utc>)> {
    let mut v = Violations::new();
    let id = v.check("session_id", uuid(&req.session_id));
    let ended_at = v.check("ended_at", timestamp(req.ended_at.as_ref()));
    v.finish(id.zip(ended_at))
}

pub fn record_sentiment(
    req: proto::RecordSentimentRequest,
) -> Violated<(Uuid, NewSentiment, Option<Uuid>)> {
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
            .map(|((id, s), r)| (id, s, r)),
    )
}

pub fn record_event(req: proto::RecordEventRequest) -> Violated<(Uuid, NewEvent, Option<Uuid>)> {
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
    v.finish(id.zip(event).zip(request).map(|((id, e), r)| (id, e, r)))
}

pub fn join(req: proto::JoinSessionRequest) -> Violated<(NewParticipation, Option<Uuid>)> {
    let mut v = Violations::new();
    let request = v.check("request_id", request_id(&req.request_id));
    let user_id = v.check("user_id", uuid(&req.user_id));
    let session_id = v.check("session_id", uuid(&req.session_id));
    let timezone_code = v.check("timezone_code", Timezone::parse_code(&req.timezone_code));
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
    v.finish(join.zip(request))
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

pub fn participation_to_proto(p: domain::Participation) -> proto::Participation {
    proto::Participation {
        id: p.id.to_string(),
        user_id: p.user_id.to_string(),
        session_id: p.session_id.to_string(),
        timezone_code: p.timezone_code,
        connected_at: Some(to_timestamp(p.connected_at)),
        disconnected_at: p.disconnected_at.map(to_timestamp),
        talked_time: p.usage.as_ref().map(|u| to_duration(u.talked_time)),
        microphone_used: p.usage.as_ref().map(|u| u.microphone_used),
        speaker_used: p.usage.as_ref().map(|u| u.speaker_used),
    }
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
            if s.score
                .is_some_and(|x| !x.is_finite() || !(-1.0..=1.0).contains(&x))
            {
                v.add("score", "must be a finite number from -1.0 to 1.0");
            }
            Err(v.into_vec())
        }
    }
}

pub fn sentiment_to_proto(s: domain::Sentiment) -> proto::Sentiment {
    proto::Sentiment {
        id: s.id.to_string(),
        participation_id: s.participation_id.to_string(),
        started_at: Some(to_timestamp(s.sentiment.started_at)),
        ended_at: Some(to_timestamp(s.sentiment.ended_at)),
        label: label_to_proto(s.sentiment.label) as i32,
        score: s.sentiment.score,
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

pub fn event_to_proto(e: domain::Event) -> proto::Event {
    proto::Event {
        id: e.id.to_string(),
        participation_id: e.participation_id.to_string(),
        occurred_at: Some(to_timestamp(e.event.occurred_at)),
        kind: event_kind_to_proto(e.event.kind) as i32,
        attributes: e.event.attributes.into_iter().collect(),
    }
}

pub fn timeline_entry_to_proto(entry: TimelineEntry) -> proto::GetTimelineResponse {
    use proto::timeline_entry::Entry;
    let entry = match entry {
        TimelineEntry::Sentiment(s) => Entry::Sentiment(sentiment_to_proto(s)),
        TimelineEntry::Event(e) => Entry::Event(event_to_proto(e)),
    };
    proto::GetTimelineResponse {
        entry: Some(proto::TimelineEntry { entry: Some(entry) }),
    }
}

pub fn receipt_to_proto(receipt: Receipt) -> proto::StreamReceipt {
    proto::StreamReceipt {
        stream_id: receipt.stream_id.to_string(),
        items_stored: receipt.items_stored,
        committed_at: Some(to_timestamp(receipt.committed_at)),
        replayed: receipt.replayed,
    }
}

pub fn stream_header(header: &proto::StreamHeader) -> Violated<StreamHeader> {
    let mut v = Violations::new();
    let stream_id = v.check("header.stream_id", uuid(&header.stream_id));
    let participation_id = v.check("header.participation_id", uuid(&header.participation_id));
    let header = stream_id
        .zip(participation_id)
        .map(|(stream_id, participation_id)| StreamHeader {
            stream_id,
            participation_id,
        });
    v.finish(header)
}

/// Converts the items of one batch; `first_index` is the stream-wide index of the first
/// item, so that violations name the item's position in the whole stream.
pub fn batch<P, T>(
    items: Vec<P>,
    first_index: u64,
    field: &str,
    convert: impl Fn(P) -> Violated<T>,
) -> Result<Vec<T>, Error> {
    if items.is_empty() {
        return Err(Error::invalid(
            format!("batch.{field}"),
            "a batch must carry at least one item",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (offset, item) in (first_index..).zip(items) {
        match convert(item) {
            Ok(value) => out.push(value),
            Err(violations) => {
                let prefix = format!("{field}[{offset}]");
                return Err(Error::InvalidArgument(
                    violations.into_iter().map(|v| v.under(&prefix)).collect(),
                ));
            }
        }
    }
    Ok(out)
}

/// Turns a frame's oneof into a domain frame; `seen` counts the items before it.
pub fn frame<B, P, T>(
    frame: Option<StreamFrame<B>>,
    seen: &mut u64,
    field: &str,
    items: impl FnOnce(B) -> Vec<P>,
    convert: impl Fn(P) -> Violated<T>,
) -> Result<Frame<T>, Error> {
    match frame {
        None => Err(Error::invalid(
            "frame",
            "each stream message must set one of header, batch or trailer",
        )),
        Some(StreamFrame::Header(header)) => Ok(Frame::Header(stream_header(&header)?)),
        Some(StreamFrame::Trailer(trailer)) => Ok(Frame::Trailer {
            item_count: trailer.item_count,
        }),
        Some(StreamFrame::Batch(b)) => {
            let converted = batch(items(b), *seen, field, convert)?;
            *seen += converted.len() as u64;
            Ok(Frame::Batch(converted))
        }
    }
}

/// The oneof of a stream message, common to both stream kinds.
pub enum StreamFrame<B> {
    Header(proto::StreamHeader),
    Batch(B),
    Trailer(proto::StreamTrailer),
}

impl From<proto::stream_sentiments_request::Frame> for StreamFrame<proto::SentimentBatch> {
    fn from(frame: proto::stream_sentiments_request::Frame) -> Self {
        use proto::stream_sentiments_request::Frame as F;
        match frame {
            F::Header(h) => Self::Header(h),
            F::Batch(b) => Self::Batch(b),
            F::Trailer(t) => Self::Trailer(t),
        }
    }
}

impl From<proto::stream_events_request::Frame> for StreamFrame<proto::EventBatch> {
    fn from(frame: proto::stream_events_request::Frame) -> Self {
        use proto::stream_events_request::Frame as F;
        match frame {
            F::Header(h) => Self::Header(h),
            F::Batch(b) => Self::Batch(b),
            F::Trailer(t) => Self::Trailer(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_range_checked_and_truncated() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(timestamp(None), Err("is required".to_owned()));
        assert!(timestamp(Some(&ts(MAX_SECONDS + 1, 0))).is_err());
        assert!(timestamp(Some(&ts(0, -1))).is_err());
        assert!(timestamp(Some(&ts(0, 1_000_000_000))).is_err());
        let t = timestamp(Some(&ts(1, 123_456_789))).unwrap_or_default();
        assert_eq!(t.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(to_timestamp(t), ts(1, 123_456_000));
    }

    #[test]
    fn durations_round_trip() {
        let d = prost_types::Duration {
            seconds: 90,
            nanos: 500_000_000,
        };
        let delta = duration(Some(&d)).unwrap_or_default();
        assert_eq!(to_duration(delta), d);
        assert!(
            duration(Some(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }))
            .is_err()
        );
        assert!(
            duration(Some(&prost_types::Duration {
                seconds: 1,
                nanos: -1
            }))
            .is_err()
        );
        let negative = prost_types::Duration {
            seconds: -18000,
            nanos: 0,
        };
        assert_eq!(
            to_duration(signed_duration(&negative).unwrap_or_default()),
            negative
        );
    }

    #[test]
    fn enums_refuse_unspecified_and_unknown() {
        assert!(session_type(0).is_err());
        assert!(session_type(99).is_err());
        assert_eq!(session_type(1), Ok(SessionType::Call));
        assert!(label(0).is_err());
        assert!(event_kind(1000).is_err());
    }

    #[test]
    fn batch_violations_carry_the_stream_index() {
        let items = vec![
            proto::NewSentiment {
                started_at: Some(prost_types::Timestamp {
                    seconds: 10,
                    nanos: 0,
                }),
                ended_at: Some(prost_types::Timestamp {
                    seconds: 11,
                    nanos: 0,
                }),
                label: 1,
                score: None,
            },
            proto::NewSentiment::default(),
        ];
        let err = batch(items, 40, "sentiments", |s| new_sentiment(&s));
        let Err(Error::InvalidArgument(violations)) = err else {
            panic!("expected invalid argument");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "sentiments[41].started_at",
                "sentiments[41].ended_at",
                "sentiments[41].label"
            ]
        );
    }
}
