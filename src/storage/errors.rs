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
        // A JoinSession committed between EndSession's read and its update.
        "sessions_ends_after_last_connection" => Error::FailedPrecondition(
            "a participant of the session connected after the end asked".into(),
        ),
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

/// The constraint an integrity error (SQLSTATE class 23) names, as the schema names it.
///
/// On Citus the constraint is a shard's copy, named after the schema's with the shard id
/// appended (`participations_no_overlap_102008`), and an error raised on a worker reaches
/// the client without the constraint field: only its message names the constraint
/// (`... violates exclusion constraint "participations_no_overlap_102008"`).
fn violated_constraint(db: &dyn sqlx::error::DatabaseError) -> Option<&str> {
    let named = match db.constraint() {
        Some(name) => name,
        None if db.code().is_some_and(|code| code.starts_with("23")) => {
            let message = db.message();
            let start = message.find("constraint \"")? + "constraint \"".len();
            let length = message[start..].find('"')?;
            &message[start..start + length]
        }
        None => return None,
    };
    Some(strip_shard_id(named))
}

/// `name` without the `_<shard id>` Citus appends to the names of a shard's constraints
/// (no constraint of the schema ends in digits).
fn strip_shard_id(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((base, shard)) if !shard.is_empty() && shard.bytes().all(|b| b.is_ascii_digit()) => {
            base
        }
        _ => name,
    }
}

/// Whether the error was raised by a command a Citus coordinator ran on a worker (its
/// context says "while executing command on <host>:<port>").
fn remote_command(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.r#where())
        .is_some_and(|context| context.contains("while executing command on"))
}

/// Translates a database error into what the client should be told.
pub fn db_error(error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Database(db) => {
            if let Some(mapped) = violated_constraint(db.as_ref()).and_then(constraint_error) {
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
                // On Citus: a worker's connection lost in the middle of a statement. The
                // coordinator reports what libpq said ("server closed the connection
                // unexpectedly", "SSL SYSCALL error") as internal_error, the code Citus
                // gives a remote failure without a SQLSTATE of its own, in the context of
                // the command it was running on that worker.
                Some("XX000") if remote_command(db.as_ref()) => Error::Unavailable(error),
                // Connection exceptions, shutdown in progress, too many connections, and
                // io_error: on Citus also a worker that could not be written to ("failed
                // to COPY to shard ..." when the worker went away mid-COPY).
                Some(code)
                    if code.starts_with("08")
                        || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "58030") =>
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
    fn a_shards_constraint_is_the_schemas() {
        assert_eq!(
            strip_shard_id("participations_no_overlap_102008"),
            "participations_no_overlap"
        );
        assert_eq!(strip_shard_id("users_pkey"), "users_pkey");
        assert_eq!(strip_shard_id("odd_"), "odd_");
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
