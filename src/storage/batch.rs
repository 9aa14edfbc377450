//! Group commit for the unary record RPCs: calls that arrive while others are being
//! written are gathered and written together, in one statement and one commit (calls
//! with a `request_id` also claim their ids, in the same statement; a batch with
//! both kinds writes each kind apart). Each call
//! still returns only once its own row is committed (or refused); a batch that fails is
//! retried item by item, so that one item's failure is never another's.
//!
//! A batch starts when no other batch is being written, and takes every call that came in
//! meanwhile: one statement in flight at a time, as big as the load makes it. Several
//! writers each starting a batch at its first call made batches of one or two calls and a
//! statement per batch: 0.48 of direct INSERTs at 16 calls in flight, against 1.11 with
//! this rule (docs/decisions/0005-one-unary-batch-in-flight.md). A write that takes
//! longer than [`STALLED`] (waiting on a lock, say) is not waited for: the next batch
//! goes beside it, on another writer, so that one slow batch never holds up the rest.
//!
//! Calls answered by a batch tend to come back together (a client sends its next call on
//! the answer). Taken as they came, the first one back made a batch of its own and the
//! rest waited for it (sizes 15, 1, 1, 15, ... at 16 in flight); so a batch that starts
//! within [`RETURNING`] of the last answer waits, up to then, for half as many calls as
//! that batch held. A lone call never waits (half of one is one), and a call after a
//! quiet spell neither.
//!
//! Each writer keeps a connection of its own between batches, not a pool's (see
//! [`WriterConnection`]; docs/decisions/0006-writers-keep-their-own-connections.md). A
//! lone call writing its row itself, without the hand-off, bought nothing measurable.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{PgConnection, postgres::PgConnectOptions};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{
    items::{self, FeedTable, Unary},
    writer_connection::{WriterConnection, unavailable},
};
use crate::error::{Error, RETRY_SAME_ID};

/// Items in one statement at most.
const MAX_BATCH: usize = 256;
/// How long a batch's write may take before the next batch stops waiting for it.
const STALLED: Duration = Duration::from_millis(20);
/// How long after a batch is answered the next one may wait for its calls to come back
/// (tokio's timers round it up to the next millisecond).
const RETURNING: Duration = Duration::from_millis(1);
/// The share (percent) of the last batch's calls the next one waits for: half measured
/// better than all (which made every batch wait for the slowest client) and than none
/// (docs/decisions/0005-one-unary-batch-in-flight.md).
const RETURNING_SHARE: usize = 50;

struct Job<T> {
    row: Unary<T>,
    done: Reply,
}

/// Where a call hears whether its row was stored.
type Reply = oneshot::Sender<Result<bool, Error>>;

/// Writes unary items of one table in batches: one batch in flight, more only beside a
/// stalled one.
pub struct Batcher<T> {
    queue: mpsc::Sender<Job<T>>,
}

impl<T> std::fmt::Debug for Batcher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<T: FeedTable> Batcher<T> {
    /// Starts `writers` writer tasks, each with a connection of its own to the database
    /// of `options` (at most that many batches in flight, when writes stall); they end
    /// when the batcher is dropped.
    pub fn spawn(options: &Arc<PgConnectOptions>, writers: usize) -> Self {
        let (queue, jobs) = mpsc::channel(MAX_BATCH * writers.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        let writes = Arc::new(Writes::default());
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(
                WriterConnection::new(Arc::clone(options)),
                Arc::clone(&jobs),
                Arc::clone(&writes),
            ));
        }
        Self { queue }
    }

    /// Stores `row` once it can be committed: `true` when stored, `false` when its
    /// participation is missing or the item lies outside it.
    #[tracing::instrument(level = "debug", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn insert(&self, row: Unary<T>) -> Result<bool, Error> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Job { row, done })
            .await
            .map_err(|_| Error::internal(anyhow::anyhow!("the unary writers have stopped")))?;
        outcome
            .await
            .map_err(|_| Error::internal(anyhow::anyhow!("a unary writer went away")))?
    }
}

async fn write_batches<T: FeedTable>(
    mut conn: WriterConnection,
    jobs: Arc<Mutex<mpsc::Receiver<Job<T>>>>,
    writes: Arc<Writes>,
) {
    loop {
        let mut batch = Vec::new();
        {
            // Wait for one job; then, while another batch is being written (and is not
            // stalled), for that write to end; then take whatever else is waiting.
            let mut jobs = jobs.lock().await;
            match jobs.recv().await {
                Some(job) => batch.push(job),
                None => break,
            }
            writes.wait_for_fresh().await;
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            crate::metrics::writer_queue("unary", &jobs);
            // The calls the last batch answered are likely on their way back (a client
            // that sends its next call on the answer): wait a moment for them, so that
            // they make one batch rather than a batch of the first back and another of
            // the rest after it.
            if let Some((expected, until)) = writes.returning() {
                let expected = (expected * RETURNING_SHARE).div_ceil(100).min(MAX_BATCH);
                while batch.len() < expected {
                    match tokio::time::timeout_at(until.into(), jobs.recv()).await {
                        Ok(Some(job)) => batch.push(job),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let started = writes.start();
        let calls = batch.len();
        let mut answers = Vec::with_capacity(calls);
        match conn.get().await {
            Ok(connection) => {
                if !write(connection, batch, &mut answers).await {
                    conn.drop_broken();
                }
            }
            Err(error) => unavailable(batch.into_iter().map(|job| job.done), &error, None),
        }
        tracing::debug!(calls, took = ?started.elapsed(), "unary batch written");
        crate::metrics::db_time("unary_batch", started);
        metrics::histogram!(crate::metrics::UNARY_BATCH_CALLS, "kind" => T::KIND)
            .record(calls as f64);
        // Let the next batch go first, then answer: replying wakes every call of the
        // batch, and the next write need not wait for that
        // (docs/decisions/0007-next-batch-before-the-answers.md).
        writes.finish(started, calls);
        for (reply, outcome) in answers {
            let _ = reply.send(outcome);
        }
    }
    conn.close().await;
}

/// The batches being written: when each started, and a signal when one ends.
#[derive(Default)]
struct Writes {
    started: std::sync::Mutex<Vec<Instant>>,
    ended: Notify,
    /// The calls of the batch answered last, and when.
    answered: std::sync::Mutex<Option<(usize, Instant)>>,
}

impl Writes {
    fn start(&self) -> Instant {
        let now = Instant::now();
        self.in_flight().push(now);
        now
    }

    fn finish(&self, started: Instant, calls: usize) {
        *lock(&self.answered) = Some((calls, Instant::now()));
        let mut in_flight = self.in_flight();
        if let Some(at) = in_flight.iter().position(|s| *s == started) {
            in_flight.swap_remove(at);
        }
        drop(in_flight);
        self.ended.notify_waiters();
    }

    /// Returns once no write younger than [`STALLED`] is in flight.
    async fn wait_for_fresh(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the look, so that an end between the two is not missed.
            ended.as_mut().enable();
            let newest = self.in_flight().iter().max().copied();
            let Some(stale_at) = newest.map(|started| started + STALLED) else {
                return;
            };
            if stale_at <= Instant::now() {
                return;
            }
            let _ = tokio::time::timeout_at(stale_at.into(), ended).await;
        }
    }

    /// The calls the last batch answered, and until when to wait for them to come back;
    /// `None` when that time has passed.
    fn returning(&self) -> Option<(usize, Instant)> {
        let (calls, at) = (*lock(&self.answered))?;
        let until = at + RETURNING;
        (Instant::now() < until).then_some((calls, until))
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, Vec<Instant>> {
        lock(&self.started)
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // What the mutexes hold stays consistent even if a holder panicked: take it as it is.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `batch` on `conn`, collecting in `answers` what each job is to hear (the
/// caller replies): the rows whose ids clients chose and those with new ids apart (only
/// the first claim their ids, [`items::insert_checked`]); `false` when the database
/// could not be reached through `conn` (every call not yet answered is told
/// UNAVAILABLE, and the connection is to be opened again).
async fn write<T: FeedTable>(
    conn: &mut PgConnection,
    batch: Vec<Job<T>>,
    answers: &mut Vec<(Reply, Result<bool, Error>)>,
) -> bool {
    let (keyed, new): (Vec<_>, Vec<_>) = batch.into_iter().partition(|job| job.row.keyed);
    let mut unreachable = None;
    for (group, keyed) in [(keyed, true), (new, false)] {
        if group.is_empty() {
            continue;
        }
        match &unreachable {
            Some(error) => unavailable(group.into_iter().map(|job| job.done), error, None),
            None => unreachable = write_group(conn, group, keyed, answers).await.err(),
        }
    }
    unreachable.is_none()
}

/// Writes one statement's rows (see [`write`]); the error when the database could not be
/// reached, every call of `group` told so.
async fn write_group<T: FeedTable>(
    conn: &mut PgConnection,
    group: Vec<Job<T>>,
    keyed: bool,
    answers: &mut Vec<(Reply, Result<bool, Error>)>,
) -> Result<(), Error> {
    let (rows, replies): (Vec<Unary<T>>, Vec<_>) =
        group.into_iter().map(|job| (job.row, job.done)).unzip();
    match items::insert_checked(conn, &rows, keyed).await {
        Ok(stored) => {
            answers.extend(replies.into_iter().zip(stored.into_iter().map(Ok)));
        }
        Err(error @ Error::Unavailable(_)) => {
            // Item by item would only fail again, once per call. The statement commits as
            // it ends: it may have been stored, and each call finds out.
            unavailable(replies, &error, Some(RETRY_SAME_ID));
            return Err(error);
        }
        Err(error) if rows.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
        Err(_) => {
            // Nothing of the batch was stored: retry alone, so each gets its own outcome.
            for (row, reply) in rows.iter().zip(replies) {
                let outcome = items::insert_checked(conn, std::slice::from_ref(row), keyed)
                    .await
                    .map(|stored| stored.first().copied().unwrap_or(false));
                let _ = reply.send(outcome);
            }
        }
    }
    Ok(())
}
