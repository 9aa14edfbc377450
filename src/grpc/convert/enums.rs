//! Enums, both ways: an unspecified or unknown value is refused by name.

use crate::domain::{EntryKind, EventKind, SentimentLabel, SessionType};
use crate::proto;

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

pub fn entry_kind(raw: i32) -> Result<EntryKind, String> {
    use proto::TimelineEntryKind as P;
    enum_value(
        raw,
        |v| P::try_from(v).ok(),
        |p| match p {
            P::Event => Some(EntryKind::Event),
            P::Sentiment => Some(EntryKind::Sentiment),
            P::Unspecified => None,
        },
        P::Unspecified,
    )
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

pub(super) fn session_type_to_proto(value: SessionType) -> proto::SessionType {
    match value {
        SessionType::Call => proto::SessionType::Call,
        SessionType::Meeting => proto::SessionType::Meeting,
        SessionType::Webinar => proto::SessionType::Webinar,
    }
}

pub(super) fn label(raw: i32) -> Result<SentimentLabel, String> {
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

pub(super) fn label_to_proto(value: SentimentLabel) -> proto::SentimentLabel {
    match value {
        SentimentLabel::Positive => proto::SentimentLabel::Positive,
        SentimentLabel::Neutral => proto::SentimentLabel::Neutral,
        SentimentLabel::Negative => proto::SentimentLabel::Negative,
    }
}

pub(super) fn event_kind(raw: i32) -> Result<EventKind, String> {
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

pub(super) fn event_kind_to_proto(value: EventKind) -> proto::EventKind {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_refuse_unspecified_and_unknown() {
        assert!(session_type(0).is_err());
        assert!(session_type(99).is_err());
        assert_eq!(session_type(1), Ok(SessionType::Call));
        assert!(label(0).is_err());
        assert!(event_kind(1000).is_err());
    }
}
