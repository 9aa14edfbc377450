//! Calls whose commit was lost on the way back: the connection broke while the database
//! committed (or may have), and the error alone cannot say whether it did. The server
//! finds out by doing the call again, once the database answers, within the call's
//! deadline: every call that goes through here is idempotent by an id fixed before its
//! first attempt (a `request_id`, or an id the server chose), so the second attempt meets
//! what the first stored (a unique key; a first attempt still in flight holds its rows'
//! keys, and the second waits for it to end) and answers from it, or stores it now.
//! Only when the database does not answer in time does the call hear that the outcome is
//! unknown ([`Error::OutcomeUnknown`]).

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::error::Error;

/// How long a call with no deadline waits for the database to answer again.
const WINDOW: Duration = Duration::from_secs(10);
/// The first pause between attempts; each next one is twice as long, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(25);
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Runs `attempt(false)`; when it fails with an unknown outcome, runs `attempt(true)`
/// until that answers (or the window closes: then the unknown outcome, saying `retry`).
/// `true` tells the attempt that an earlier one may have been stored: an end, a leave or
/// a delete that finds its own change already made is then answered as made. An attempt
/// that could not reach the database at all is tried again too, once the outcome is in
/// question.
pub async fn settled<T, F, Fut>(retry: &'static str, mut attempt: F) -> Result<T, Error>
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let first = attempt(false).await;
    let cause = match first {
        Err(Error::OutcomeUnknown { cause, .. }) => cause,
        answered => return answered,
    };
    let mut settling = Settling::start();
    while settling.pause().await {
        match attempt(true).await {
            Err(error) if still_unknown(&error) => {}
            answered => return settling.found(answered),
        }
    }
    Err(settling.unknown(retry, cause))
}

/// Whether an attempt after a lost commit failed without learning anything: the database
/// out of reach, or the attempt stopped (the deadline, a deadlock) before it could meet
/// what the lost commit stored. Its own "nothing was stored" would speak of itself only.
pub fn still_unknown(error: &Error) -> bool {
    matches!(
        error,
        Error::Unavailable(_)
            | Error::OutcomeUnknown { .. }
            | Error::DeadlineExceeded
            | Error::Aborted(_)
    )
}

/// The attempts after a lost commit: paced, and bounded by the call's deadline.
pub struct Settling {
    until: Instant,
    pause: Duration,
}

impl Settling {
    pub fn start() -> Self {
        metrics::counter!(crate::metrics::COMMITS_IN_DOUBT).increment(1);
        Self {
            until: window_end(),
            pause: FIRST_PAUSE,
        }
    }

    /// Waits before the next attempt; `false` when there is no time left for one.
    pub async fn pause(&mut self) -> bool {
        if Instant::now() + self.pause >= self.until {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        true
    }

    /// An attempt answered: what the call hears.
    pub fn found<T>(self, answered: Result<T, Error>) -> Result<T, Error> {
        tracing::info!("a commit whose answer was lost was found out");
        answered
    }

    /// No attempt answered in time.
    pub fn unknown(self, retry: &'static str, cause: sqlx::Error) -> Error {
        metrics::counter!(crate::metrics::COMMITS_UNRESOLVED).increment(1);
        Error::OutcomeUnknown { retry, cause }
    }
}

/// When to stop trying: before the call's deadline, with a tenth of what is left (up to
/// 100 ms) kept for the answer to leave; [`WINDOW`] from now at most.
fn window_end() -> Instant {
    let now = Instant::now();
    let window = crate::deadline::remaining().map_or(WINDOW, |left| {
        let margin = (left / 10).min(Duration::from_millis(100));
        left.saturating_sub(margin).min(WINDOW)
    });
    now + window
}
