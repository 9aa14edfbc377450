//! Group commit for the unary record RPCs: calls that arrive while others are being
//! written are gathered and written together, in one statement and one commit. Each call
//! still returns only once its own row is committed (or refused); a batch that fails is
//! retried item by item, so that one item's failure is never another's. (A lone call
//! writing its row itself, without the hand-off, was measured and bought nothing
//! measurable: docs/BENCHMARKS.md, issue 16.)

use std::{collections::HashSet, sync::Arc};

use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::items::{FeedTable, Unary};
use crate::error::Error;

/// Items in one statement at most.
const MAX_BATCH: usize = 256;

struct Job<T> {
    row: Unary<T>,
    done: oneshot::Sender<Result<bool, Error>>,
}

/// Writes unary items of one table in batches, with a few writers in parallel.
pub struct Batcher<T> {
    queue: mpsc::Sender<Job<T>>,
}

impl<T> std::fmt::Debug for Batcher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<T: FeedTable> Batcher<T> {
    /// Starts `writers` writer tasks on `pool`; they end when the batcher is dropped.
    pub fn spawn(pool: PgPool, writers: usize) -> Self {
        let (queue, jobs) = mpsc::channel(MAX_BATCH * writers.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(pool.clone(), Arc::clone(&jobs)));
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

async fn write_batches<T: FeedTable>(pool: PgPool, jobs: Arc<Mutex<mpsc::Receiver<Job<T>>>>) {
    loop {
        let mut batch = Vec::new();
        {
            // Wait for one job, then take whatever else is already waiting.
            let mut jobs = jobs.lock().await;
            match jobs.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        write(&pool, batch).await;
    }
}

async fn write<T: FeedTable>(pool: &PgPool, batch: Vec<Job<T>>) {
    let (rows, replies): (Vec<Unary<T>>, Vec<_>) =
        batch.into_iter().map(|job| (job.row, job.done)).unzip();
    match T::insert_checked(pool, &rows).await {
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
                let outcome = T::insert_checked(pool, std::slice::from_ref(row))
                    .await
                    .map(|stored| stored.contains(&row.id));
                let _ = reply.send(outcome);
            }
        }
    }
}
