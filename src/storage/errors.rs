//! SQLSTATE and constraint names -> [`Error`]: the one translation of database errors.

use crate::error::{Error, FieldViolation};

/// Constraints a client can run into, and what the client is told.
fn constraint_error(constraint: &str) -> Option<Error> {
    let error = match constraint {
        "user_external_ids_pkey" => {
            Error::AlreadyExists("a user with this external_id exists already".into())
        }
        "participations_user_session_key" => {
            Error::AlreadyExists("the user has joined this session already".into())
        }
        "participations_no_overlap" => Error::FailedPrecondition(
            "the participation would overlap another participation of the same user \
             (a participation that has not been left runs until it is)"
                .into(),
        ),
        "participations_user_fkey" => {
            Error::NotFound("the user of the request does not exist".into())
        }
        "participations_session_fkey" => {
            Error::NotFound("the session of the request does not exist".into())
        }
        "participations_timezone_fkey" => {
            Error::NotFound("the timezone of the request does not exist".into())
        }
        "sentiments_participation_fkey"
        | "events_participation_fkey"
        | "ingest_streams_participation_fkey" => {
            Error::NotFound("the participation of the request does not exist".into())
        }
        "sessions_ends_after_start" => Error::invalid("ended_at", "must not be before started_at"),
        "sentiments_ends_after_start" => Error::invalid("ended_at", "must be after started_at"),
        "sentiments_score_range" => {
            Error::invalid("score", "must be a finite number from -1.0 to 1.0")
        }
        "participations_disconnect_after_connect" => {
            Error::invalid("disconnected_at", "must not be before connected_at")
        }
        "participations_talked_time_fits" => Error::invalid(
            "talked_time",
            "must not be negative or longer than the participation lasted",
        ),
        _ => return None,
    };
    Some(error)
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        db_error(error)
    }
}

/// Translates a database error into what the client should be told.
pub fn db_error(error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Database(db) => {
            if let Some(mapped) = db.constraint().and_then(constraint_error) {
                return mapped;
            }
            match db.code().as_deref() {
                // Text that PostgreSQL cannot store (NUL bytes, bad encoding).
                Some("22P05" | "22021") => Error::InvalidArgument(vec![FieldViolation::new(
                    "",
                    "contains characters PostgreSQL cannot store (NUL)",
                )]),
                Some("40001" | "40P01") => Error::Aborted(error),
                // query_canceled: the call's statement_timeout, or its cancellation.
                Some("57014") => Error::DeadlineExceeded,
                // Connection exceptions, shutdown in progress, too many connections.
                Some(code)
                    if code.starts_with("08")
                        || matches!(code, "57P01" | "57P02" | "57P03" | "53300") =>
                {
                    Error::Unavailable(error)
                }
                _ => Error::internal(error),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Error::Unavailable(error),
        _ => Error::internal(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn pool_and_io_failures_are_unavailable() {
        assert_eq!(
            db_error(sqlx::Error::PoolTimedOut).code(),
            Code::Unavailable
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(db_error(sqlx::Error::Io(io)).code(), Code::Unavailable);
        assert_eq!(db_error(sqlx::Error::RowNotFound).code(), Code::Internal);
    }

    #[test]
    fn every_named_constraint_is_a_client_error() {
        for name in [
            "user_external_ids_pkey",
            "participations_user_session_key",
            "participations_no_overlap",
            "sentiments_participation_fkey",
            "sentiments_score_range",
        ] {
            let code = constraint_error(name).map(|e| e.code());
            assert!(
                matches!(
                    code,
                    Some(
                        Code::AlreadyExists
                            | Code::FailedPrecondition
                            | Code::NotFound
                            | Code::InvalidArgument
                    )
                ),
                "{name}: {code:?}"
            );
        }
    }
}
