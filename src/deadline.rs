//! The deadline of the call being served, so that no database work outlives its caller.
//!
//! The gRPC layer reads the client's `grpc-timeout` and runs the call inside
//! [`scope`]; storage reads [`remaining`] when it opens a transaction and gives
//! PostgreSQL the same limit (`SET LOCAL statement_timeout`). tonic drops the call at the
//! deadline; without the limit, a statement it was waiting for (a long DELETE, a wait for
//! a lock) would go on in PostgreSQL after the client had its answer.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `call` with `deadline` as the deadline of the call (none: no deadline).
pub async fn scope<F: Future>(deadline: Option<Instant>, call: F) -> F::Output {
    match deadline {
        Some(deadline) => DEADLINE.scope(deadline, call).await,
        None => call.await,
    }
}

/// What is left of the current call's deadline; `None` when the call has none.
pub fn remaining() -> Option<Duration> {
    DEADLINE
        .try_with(|deadline| deadline.saturating_duration_since(Instant::now()))
        .ok()
}

/// Parses a `grpc-timeout` value: 1 to 8 digits and a unit (H, M, S, m, u, n), as the
/// gRPC over HTTP/2 protocol defines it.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_defines_them() {
        assert_eq!(parse_grpc_timeout("120S"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_deadline_is_seen_inside_the_scope_only() {
        assert_eq!(remaining(), None);
        let deadline = Instant::now() + Duration::from_secs(10);
        let inside = scope(Some(deadline), async { remaining() }).await;
        assert!(inside.is_some_and(|left| left <= Duration::from_secs(10)));
        assert_eq!(scope(None, async { remaining() }).await, None);
    }
}
