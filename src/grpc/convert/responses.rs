//! Domain values -> protobuf responses.

use chrono::TimeDelta;

use super::enums::{event_kind_to_proto, label_to_proto, session_type_to_proto};
use crate::domain::{self, CountryCode, LanguageTag, Receipt, Session, Timezone, User};
use crate::proto::{self, to_duration, to_timestamp};

pub fn user_to_proto(user: User) -> proto::User {
    proto::User {
        id: user.id.to_string(),
        external_id: user.external_id.into_string(),
        country: user
            .country
            .map(CountryCode::into_string)
            .unwrap_or_default(),
        native_language: user
            .native_language
            .map(LanguageTag::into_string)
            .unwrap_or_default(),
        region: user.region.unwrap_or_default(),
        created_at: Some(to_timestamp(user.created_at)),
    }
}

pub fn timezone_to_proto(tz: Timezone) -> proto::Timezone {
    proto::Timezone {
        code: tz.code.into_string(),
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

pub fn participation_to_proto(p: domain::Participation) -> proto::Participation {
    proto::Participation {
        id: p.id.to_string(),
        user_id: p.user_id.to_string(),
        session_id: p.session_id.to_string(),
        timezone_code: p.timezone_code.into_string(),
        connected_at: Some(to_timestamp(p.connected_at)),
        disconnected_at: p.disconnected_at.map(to_timestamp),
        talked_time: p.usage.as_ref().map(|u| to_duration(u.talked_time)),
        microphone_used: p.usage.as_ref().map(|u| u.microphone_used),
        speaker_used: p.usage.as_ref().map(|u| u.speaker_used),
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

pub fn event_to_proto(e: domain::Event) -> proto::Event {
    proto::Event {
        id: e.id.to_string(),
        participation_id: e.participation_id.to_string(),
        occurred_at: Some(to_timestamp(e.event.occurred_at)),
        kind: event_kind_to_proto(e.event.kind) as i32,
        attributes: e.event.attributes.into_iter().collect(),
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
