use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use super::TimezoneCode;

stored_enum!(
    /// What kind of session a session is. Stored as its lower-case name.
    SessionType {
        Call => "call",
        Meeting => "meeting",
        Webinar => "webinar",
    }
);

/// A stored session.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: Uuid,
    pub session_type: SessionType,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// The latest connection of a participation in it, which its end may not precede.
    pub last_connected_at: Option<DateTime<Utc>>,
}

impl Session {
    /// Derived from start and end; `None` while the session goes on.
    pub fn duration(&self) -> Option<TimeDelta> {
        self.ended_at.map(|end| end - self.started_at)
    }

    /// Why a user cannot connect at `connected_at`, if they cannot.
    pub fn refuses_connection_at(&self, connected_at: DateTime<Utc>) -> Option<String> {
        if connected_at < self.started_at {
            return Some(format!(
                "connected_at {connected_at} is before the session started ({})",
                self.started_at
            ));
        }
        match self.ended_at {
            Some(end) if connected_at > end => Some(format!(
                "connected_at {connected_at} is after the session ended ({end})"
            )),
            _ => None,
        }
    }

    /// Why the session cannot end at `ended_at`, if it cannot.
    pub fn refuses_end_at(&self, ended_at: DateTime<Utc>) -> Option<SessionEndRefusal> {
        if let Some(end) = self.ended_at {
            return Some(SessionEndRefusal::Ended(format!(
                "session {} ended already, at {end}",
                self.id
            )));
        }
        if ended_at < self.started_at {
            return Some(SessionEndRefusal::BeforeStart(format!(
                "must not be before the session started ({})",
                self.started_at
            )));
        }
        match self.last_connected_at {
            Some(last) if ended_at < last => Some(SessionEndRefusal::Ended(format!(
                "a participant of session {} connected at {last}, after the end asked",
                self.id
            ))),
            _ => None,
        }
    }
}

/// Why a session cannot end at the time asked.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEndRefusal {
    /// `ended_at` is before the session started: the request is wrong whatever is stored.
    BeforeStart(String),
    /// What is stored refuses it: the session ended, or a participant connected later.
    Ended(String),
}

/// A participation to create when a user joins a session.
#[derive(Debug, Clone, PartialEq)]
pub struct NewParticipation {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub timezone_code: TimezoneCode,
    pub connected_at: DateTime<Utc>,
}

/// What a user's leaving records.
#[derive(Debug, Clone, PartialEq)]
pub struct Leave {
    pub participation_id: Uuid,
    pub disconnected_at: DateTime<Utc>,
    pub talked_time: TimeDelta,
    pub microphone_used: bool,
    pub speaker_used: bool,
}

/// The usage figures a participation gets when the user leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub talked_time: TimeDelta,
    pub microphone_used: bool,
    pub speaker_used: bool,
}

/// Why a participation cannot be left as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaveRefusal {
    /// It was left already: the request is fine, the state is not.
    AlreadyLeft(String),
    /// A field of the request is at odds with the participation.
    Field(&'static str, String),
}

/// Which end of an item's span lies outside its participation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanEnd {
    Start,
    End,
}

/// A stored participation: a user's presence in a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Participation {
    pub id: Uuid,
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub timezone_code: TimezoneCode,
    pub connected_at: DateTime<Utc>,
    pub disconnected_at: Option<DateTime<Utc>>,
    pub usage: Option<Usage>,
}

impl Participation {
    /// Why `leave` cannot close this participation, if it cannot.
    pub fn refuses_leave(&self, leave: &Leave) -> Option<LeaveRefusal> {
        if let Some(at) = self.disconnected_at {
            return Some(LeaveRefusal::AlreadyLeft(format!(
                "the participation was left already, at {at}"
            )));
        }
        if leave.disconnected_at < self.connected_at {
            return Some(LeaveRefusal::Field(
                "disconnected_at",
                format!(
                    "must not be before the participation connected ({})",
                    self.connected_at
                ),
            ));
        }
        if leave.talked_time > leave.disconnected_at - self.connected_at {
            return Some(LeaveRefusal::Field(
                "talked_time",
                "must not be longer than the participation lasted".to_owned(),
            ));
        }
        None
    }

    /// Why an item spanning `start..=end` cannot belong to this participation, if it cannot.
    pub fn refuses_span(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Option<(SpanEnd, String)> {
        if start < self.connected_at {
            return Some((
                SpanEnd::Start,
                format!(
                    "is before the participation connected ({})",
                    self.connected_at
                ),
            ));
        }
        match self.disconnected_at {
            Some(gone) if end > gone => Some((
                SpanEnd::End,
                format!("is after the participation disconnected ({gone})"),
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap_or_default()
    }

    fn participation(disconnected_at: Option<DateTime<Utc>>) -> Participation {
        Participation {
            id: Uuid::nil(),
            user_id: Uuid::nil(),
            session_id: Uuid::nil(),
            timezone_code: TimezoneCode::from_stored("UTC".into()),
            connected_at: at(0),
            disconnected_at,
            usage: None,
        }
    }

    #[test]
    fn spans_must_lie_inside_the_participation() {
        let open = participation(None);
        assert!(open.refuses_span(at(0), at(10_000)).is_none());
        assert_eq!(
            open.refuses_span(at(-1), at(5)).map(|r| r.0),
            Some(SpanEnd::Start)
        );
        let closed = participation(Some(at(100)));
        assert!(closed.refuses_span(at(0), at(100)).is_none());
        assert_eq!(
            closed.refuses_span(at(50), at(101)).map(|r| r.0),
            Some(SpanEnd::End)
        );
    }

    #[test]
    fn leave_rules() {
        let open = participation(None);
        let leave = |secs, talked| Leave {
            participation_id: Uuid::nil(),
            disconnected_at: at(secs),
            talked_time: TimeDelta::seconds(talked),
            microphone_used: true,
            speaker_used: true,
        };
        assert!(open.refuses_leave(&leave(60, 60)).is_none());
        let field = |refusal: Option<LeaveRefusal>| match refusal {
            Some(LeaveRefusal::Field(field, _)) => Some(field),
            _ => None,
        };
        assert_eq!(
            field(open.refuses_leave(&leave(60, 61))),
            Some("talked_time")
        );
        assert_eq!(
            field(open.refuses_leave(&leave(-1, 0))),
            Some("disconnected_at")
        );
        assert!(matches!(
            participation(Some(at(5))).refuses_leave(&leave(60, 0)),
            Some(LeaveRefusal::AlreadyLeft(_))
        ));
    }

    #[test]
    fn sessions_refuse_connections_outside_them() {
        let session = Session {
            id: Uuid::nil(),
            session_type: SessionType::Call,
            started_at: at(0),
            ended_at: Some(at(100)),
            last_connected_at: None,
        };
        assert!(session.refuses_connection_at(at(0)).is_none());
        assert!(session.refuses_connection_at(at(-1)).is_some());
        assert!(session.refuses_connection_at(at(101)).is_some());
        assert_eq!(session.duration(), Some(TimeDelta::seconds(100)));
    }

    #[test]
    fn sessions_end_after_their_start_and_their_last_connection() {
        let session = Session {
            id: Uuid::nil(),
            session_type: SessionType::Call,
            started_at: at(0),
            ended_at: None,
            last_connected_at: Some(at(50)),
        };
        assert!(session.refuses_end_at(at(50)).is_none());
        assert!(matches!(
            session.refuses_end_at(at(-1)),
            Some(SessionEndRefusal::BeforeStart(_))
        ));
        assert!(matches!(
            session.refuses_end_at(at(49)),
            Some(SessionEndRefusal::Ended(_))
        ));
        let ended = Session {
            ended_at: Some(at(60)),
            ..session
        };
        assert!(matches!(
            ended.refuses_end_at(at(70)),
            Some(SessionEndRefusal::Ended(_))
        ));
    }
}
