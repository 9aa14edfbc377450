//! The service's error type, and the one place where it becomes a `tonic::Status`.

use tonic::{Code, Status};

pub use crate::domain::{FieldViolation, Violations};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can go wrong while serving a request. Each variant says the status
/// code a client receives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `INVALID_ARGUMENT`, with every violation in a `BadRequest` detail.
    #[error("invalid request: {}", summarize(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// `NOT_FOUND`: a referenced entity does not exist.
    #[error("{0}")]
    NotFound(String),
    /// `ALREADY_EXISTS`.
    #[error("{0}")]
    AlreadyExists(String),
    /// `FAILED_PRECONDITION`: well formed, but at odds with stored state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// `ABORTED`: a concurrency conflict (serialization failure, deadlock); retry.
    #[error("the transaction was aborted by a concurrent one; nothing was stored, retry")]
    Aborted(#[source] sqlx::Error),
    /// `ABORTED`: a live feed was opened by a newer stream; this one may write no more.
    #[error("{0}")]
    Superseded(String),
    /// `CANCELLED`: the client's request stream broke off.
    #[error("the request stream broke off ({0}); nothing was stored")]
    StreamBroken(String),
    /// `RESOURCE_EXHAUSTED`: a limit was hit. With `retry_after` (load shedding) the
    /// client may retry after that delay; without it, the request itself is too large.
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    /// `DEADLINE_EXCEEDED`: the call's deadline passed while the database worked on it;
    /// PostgreSQL stopped the statement and nothing of the call was stored.
    #[error("the deadline of the call passed before the database finished; nothing was stored")]
    DeadlineExceeded,
    /// `UNAVAILABLE`: the server is shutting down; nothing of the call was stored.
    #[error("the server is shutting down; nothing of this call was stored, retry")]
    ShuttingDown,
    /// `UNAVAILABLE`: the database could not be reached before anything of the call was
    /// committed (a connection that would not open, or one lost inside a transaction
    /// before its COMMIT): nothing of the call was stored; retry later.
    #[error("the database is unavailable; nothing was stored, retry later")]
    Unavailable(#[source] sqlx::Error),
    /// `UNAVAILABLE` with an `ErrorInfo` detail (reason [`OUTCOME_UNKNOWN`]): the
    /// connection was lost while the database committed (or may have), and the server
    /// could not find out in time whether it did. `retry` says how a retry is safe.
    #[error(
        "the connection to the database was lost while it committed, and it did not answer \
         again in time: whether this call was stored is not known; {retry}"
    )]
    OutcomeUnknown {
        retry: &'static str,
        #[source]
        cause: sqlx::Error,
    },
    /// `INTERNAL`: a bug or an unexpected database error. Details are logged, not sent.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The `ErrorInfo` reason of [`Error::OutcomeUnknown`], for clients to match on.
pub const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";
/// How a call whose outcome is unknown is retried safely, when it carried its id.
pub const RETRY_SAME_ID: &str =
    "a retry with the same request_id is safe: it returns what was stored, or stores it once";
/// The same, for a call that carried no `request_id`.
pub const RETRY_WITHOUT_ID: &str = "the call had no request_id, so a retry may store it a second time: check before retrying, and send a request_id to make retries safe";

/// The same, for a call that changes what exists (an end, a leave, a delete).
pub const RETRY_AFTER_READ: &str = "read it back (GetSession, GetParticipation or GetUser) to see whether the change was made before sending it again";

/// The `ErrorInfo` domain of the reasons this service gives.
pub const ERROR_DOMAIN: &str = "ingest.krisp.v1";

/// At most this many field violations go into a status.
const MAX_REPORTED_VIOLATIONS: usize = 20;
/// At most this many characters of a field path or description go into a status.
const MAX_REPORTED_CHARS: usize = 200;

fn bounded(text: String) -> String {
    if text.chars().count() <= MAX_REPORTED_CHARS {
        text
    } else {
        let mut cut: String = text.chars().take(MAX_REPORTED_CHARS).collect();
        cut.push_str("...");
        cut
    }
}

fn summarize(violations: &[FieldViolation]) -> String {
    match violations {
        [] => "no details".to_owned(),
        [only] => bounded(only.to_string()),
        [first, rest @ ..] => format!("{} (and {} more)", bounded(first.to_string()), rest.len()),
    }
}

impl Error {
    /// `INVALID_ARGUMENT` for a single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    pub fn not_found(entity: &'static str, id: impl std::fmt::Display) -> Self {
        Self::NotFound(format!("{entity} {id} not found"))
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }

    /// The gRPC status code the client receives.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Aborted(_) | Self::Superseded(_) => Code::Aborted,
            Self::StreamBroken(_) => Code::Cancelled,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::ShuttingDown => Code::Unavailable,
            Self::Unavailable(_) | Self::OutcomeUnknown { .. } => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        match &error {
            Error::Unavailable(cause)
            | Error::Aborted(cause)
            | Error::OutcomeUnknown { cause, .. } => {
                tracing::warn!(error = %cause, "request failed: {error}");
            }
            Error::Internal(cause) => {
                tracing::error!(
                    error = format!("{cause:#}"),
                    "request failed: internal error"
                );
            }
            _ => tracing::info!(code = ?code, "request rejected: {error}"),
        }
        let message = error.to_string();
        match error {
            Error::InvalidArgument(violations) => {
                // Details travel in HTTP/2 headers, which peers cap (16 KiB by default):
                // report a bounded number of bounded violations.
                let violations: Vec<_> = violations
                    .into_iter()
                    .take(MAX_REPORTED_VIOLATIONS)
                    .map(|v| {
                        tonic_types::FieldViolation::new(bounded(v.field), bounded(v.description))
                    })
                    .collect();
                Status::with_error_details(
                    code,
                    message,
                    ErrorDetails::with_bad_request(violations),
                )
            }
            Error::ResourceExhausted {
                retry_after: Some(delay),
                ..
            } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(delay)),
            ),
            Error::OutcomeUnknown { retry, .. } => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_error_info(
                    OUTCOME_UNKNOWN,
                    ERROR_DOMAIN,
                    [("retry".to_owned(), retry.to_owned())],
                ),
            ),
            _ => Status::new(code, message),
        }
    }
}

impl Error {
    /// This error, met while the database committed the call's writes (or may have: a
    /// statement outside a transaction commits as it ends): losing the database then
    /// leaves the outcome unknown, where before the commit it means nothing was stored.
    pub fn at_commit(self) -> Self {
        match self {
            // Never sent: the pool had no connection to give.
            Self::Unavailable(cause @ (sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)) => {
                Self::Unavailable(cause)
            }
            Self::Unavailable(cause) => Self::OutcomeUnknown {
                retry: RETRY_SAME_ID,
                cause,
            },
            other => other,
        }
    }
}

impl From<Vec<FieldViolation>> for Error {
    fn from(violations: Vec<FieldViolation>) -> Self {
        Self::InvalidArgument(violations)
    }
}

impl From<FieldViolation> for Error {
    fn from(violation: FieldViolation) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shed_calls_carry_retry_info() {
        let status = Status::from(Error::ResourceExhausted {
            message: "busy".into(),
            retry_after: Some(std::time::Duration::from_millis(500)),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status.get_error_details().retry_info().cloned();
        assert!(
            retry.is_some_and(|r| r.retry_delay == Some(std::time::Duration::from_millis(500)))
        );
        let http = status.into_http::<()>();
        assert!(http.headers().contains_key("grpc-status-details-bin"));
    }

    #[test]
    fn an_unknown_outcome_says_so_in_an_error_info() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let error = Error::Unavailable(sqlx::Error::Io(io)).at_commit();
        let status = Status::from(error);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("not known"),
            "{}",
            status.message()
        );
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.reason, OUTCOME_UNKNOWN);
        assert_eq!(info.metadata["retry"], RETRY_SAME_ID);
        let never_sent = Error::Unavailable(sqlx::Error::PoolTimedOut).at_commit();
        assert!(matches!(never_sent, Error::Unavailable(_)));
    }

    #[test]
    fn field_violations_are_in_a_bad_request_detail() {
        let status = Status::from(Error::invalid("sentiments[3].score", "must be finite"));
        let details = status.get_error_details();
        let violations = details
            .bad_request()
            .map(|b| b.field_violations.clone())
            .unwrap_or_default();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "sentiments[3].score");
        assert!(
            status
                .message()
                .contains("sentiments[3].score: must be finite")
        );
    }
}
