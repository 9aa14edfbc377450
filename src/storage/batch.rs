//! Group commit for the unary record RPCs: calls that arrive while others are being
//! written are gathered and written together, in one statement and one commit. Each call
//! still returns only once its own row is committed (or refused); a batch that fails is
//! retried item by item, so that one item's failure is never another's.
//!
//! A batch starts when no other batch is being written, and takes every call that came in
//! meanwhile: one statement in flight at a time, as big as the load makes it. Several
//! writers with a batch each as soon as a call came in (the first design) made batches of
//! one or two calls and a statement per batch: 0.48 of direct INSERTs at 16 calls in
//! flight, against 1.11 with this rule (docs/BENCHMARKS.md, issue 16). A write that takes
//! longer than [`STALLED`] (waiting on a lock, say) is not waited for: the next batch
//! goes beside it, on another writer, so that one slow batch never holds up the rest.
//! (A lone call writing its row itself, without the hand-off, was measured and bought
//! nothing measurable.)

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use uuid::Uuid;

use super::items::{FeedTable, Unary};
use crate::error::Error;

/// Items in one statement at most.
const MAX_BATCH: usize = 256;
/// How long a batch's write may take before the next batch stops waiting for it.
const STALLED: Duration = Duration::from_millis(20);

struct Job<T> {
    row: Unary<T>,
    done: oneshot::Sender<Result<bool, Error>>,
}

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
    /// Starts `writers` writer tasks on `pool` (at most that many batches in flight, when
    /// writes stall); they end when the batcher is dropped.
    pub fn spawn(pool: PgPool, writers: usize) -> Self {
        let (queue, jobs) = mpsc::channel(MAX_BATCH * writers.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        let writes = Arc::new(Writes::default());
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(
                pool.clone(),
                Arc::clone(&jobs),
                Arc::clone(&writes),
            ));
        }
        Self { queue }
    }

    /// Stores `row` once it can be committed: `true` when stored, `false` when its
    /// participation is missing or the item lies outside it.
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
    pool: PgPool,
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
                None => return,
            }
            writes.wait_for_fresh().await;
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        let started = writes.start();
        match pool.acquire().await {
            Ok(mut conn) => write(&mut conn, batch).await,
            Err(error) => {
                // No connection to be had: UNAVAILABLE (retryable) for every call.
                let message = error.to_string();
                for job in batch {
                    let io = std::io::Error::other(message.clone());
                    let _ = job.done.send(Err(Error::from(sqlx::Error::Io(io))));
                }
            }
        }
        writes.finish(started);
    }
}

/// The batches being written: when each started, and a signal when one ends.
#[derive(Default)]
struct Writes {
    started: std::sync::Mutex<Vec<Instant>>,
    ended: Notify,
}

impl Writes {
    fn start(&self) -> Instant {
        let now = Instant::now();
        self.in_flight().push(now);
        now
    }

    fn finish(&self, started: Instant) {
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

    fn in_flight(&self) -> std::sync::MutexGuard<'_, Vec<Instant>> {
        // The list stays consistent even if a holder panicked: take it as it is.
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Writes `batch` on `conn`, replying to each job.
async fn write<T: FeedTable>(conn: &mut PgConnection, batch: Vec<Job<T>>) {
    let (rows, replies): (Vec<Unary<T>>, Vec<_>) =
        batch.into_iter().map(|job| (job.row, job.done)).unzip();
    match T::insert_checked(conn, &rows).await {
        Ok(stored) => {
            let stored: HashSet<Uuid> = stored.into_iter().collect();
            for (row, reply) in rows.iter().zip(replies) {
                let _ = reply.send(Ok(stored.contains(&row.id)));
            }
        }
        Err(error) if rows.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
        Err(_) => {
            // Nothing of the batch was stored: retry alone, so each gets its own outcome.
            for (row, reply) in rows.iter().zip(replies) {
                let outcome = T::insert_checked(conn, std::slice::from_ref(row))
                    .await
                    .map(|stored| stored.contains(&row.id));
                let _ = reply.send(outcome);
            }
        }
    }
}
