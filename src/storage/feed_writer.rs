//! Group commit for live feeds: the appends of many feeds that arrive while others are
//! being written are gathered and written in one transaction (one statement advancing
//! every feed's position, one COPY per table, one commit), by a few writer tasks with a
//! connection each, outside the pool. Each append is answered only once its own items are
//! committed, or refused; a batch that fails is retried append by append, so that one
//! feed's failure is never another's (unless the database is out of reach: then all hear
//! it at once).

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::feeds::{Append, append_feeds, superseded};
use crate::error::Error;

/// Appends in one transaction at most, and items.
const MAX_APPENDS: usize = 1024;
const MAX_ITEMS: usize = 20_000;

struct Job {
    append: Append,
    done: oneshot::Sender<Result<(), Error>>,
}

/// The live feeds' writers.
pub struct FeedWriter {
    queue: mpsc::Sender<Job>,
}

impl std::fmt::Debug for FeedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedWriter").finish_non_exhaustive()
    }
}

impl FeedWriter {
    /// Starts `writers` writer tasks on `pool` (the writers' own, one connection each);
    /// they end when the writer is dropped.
    pub fn spawn(pool: PgPool, writers: usize) -> Self {
        let (queue, jobs) = mpsc::channel(MAX_APPENDS * writers.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(pool.clone(), Arc::clone(&jobs)));
        }
        Self { queue }
    }

    /// Writes `append` with others; returns once it is committed (or refused: ABORTED
    /// when a newer stream holds the feed).
    pub async fn append(&self, append: Append) -> Result<(), Error> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Job { append, done })
            .await
            .map_err(|_| Error::internal(anyhow::anyhow!("the feed writers have stopped")))?;
        outcome
            .await
            .map_err(|_| Error::internal(anyhow::anyhow!("a feed writer went away")))?
    }
}

async fn write_batches(pool: PgPool, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let mut batch = Vec::new();
        let mut items = 0;
        {
            // Wait for one job, then take whatever else is already waiting.
            let mut jobs = jobs.lock().await;
            match jobs.recv().await {
                Some(job) => {
                    items += job.append.items.len();
                    batch.push(job);
                }
                None => return,
            }
            while batch.len() < MAX_APPENDS && items < MAX_ITEMS {
                match jobs.try_recv() {
                    Ok(job) => {
                        items += job.append.items.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
        }
        write(&pool, batch).await;
    }
}

async fn write(pool: &PgPool, batch: Vec<Job>) {
    let (appends, replies): (Vec<Append>, Vec<_>) =
        batch.into_iter().map(|job| (job.append, job.done)).unzip();
    match commit(pool, &appends).await {
        Ok(written) => {
            for ((append, reply), written) in appends.iter().zip(replies).zip(written) {
                let outcome = if written {
                    Ok(())
                } else {
                    Err(superseded(append.feed_id))
                };
                let _ = reply.send(outcome);
            }
        }
        Err(error) if appends.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
        Err(Error::Unavailable(_)) => {
            // The database is out of reach: one by one would only wait for it again, once
            // per append. Every feed hears it now and resumes later.
            for reply in replies {
                let _ = reply.send(Err(Error::Unavailable(sqlx::Error::PoolTimedOut)));
            }
        }
        Err(_) => {
            // Nothing of the batch was stored: alone, each gets its own outcome.
            for (append, reply) in appends.iter().zip(replies) {
                let outcome =
                    commit(pool, std::slice::from_ref(append))
                        .await
                        .and_then(|written| match written.first() {
                            Some(true) => Ok(()),
                            _ => Err(superseded(append.feed_id)),
                        });
                let _ = reply.send(outcome);
            }
        }
    }
}

async fn commit(pool: &PgPool, appends: &[Append]) -> Result<Vec<bool>, Error> {
    let mut tx = pool.begin().await?;
    let written = append_feeds(&mut tx, appends).await?;
    tx.commit().await?;
    metrics::histogram!(crate::metrics::FEED_BATCH_APPENDS).record(appends.len() as f64);
    Ok(written)
}
