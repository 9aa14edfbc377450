//! Group commit for live feeds: the appends of many feeds that arrive while others are
//! being written are gathered and written in one transaction (one statement advancing
//! every feed's position, one COPY per table, one commit), by a few writer tasks with a
//! connection each, outside the pool, kept between batches (`writer_connection`). Each
//! append is answered only once its own items are committed, or refused; a batch that
//! fails is retried append by append, so that one feed's failure is never another's
//! (unless the database is out of reach: then all hear it at once).

use std::sync::Arc;

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{
    feeds::{Append, Appended, append_feeds, superseded},
    writer_connection::{WriterConnection, unavailable},
};
use crate::error::Error;

/// How a feed whose append's outcome is unknown goes on.
const RETRY_FEED: &str = "open the feed again with the same feed_id: the answer to Open says the position stored, and the items after it are to be sent again";

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
    /// Starts `writers` writer tasks, each with a connection of its own to the database
    /// of `options`; they end when the writer is dropped.
    pub fn spawn(options: &Arc<PgConnectOptions>, writers: usize) -> Self {
        let (queue, jobs) = mpsc::channel(MAX_APPENDS * writers.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..writers.max(1) {
            let conn = WriterConnection::new(Arc::clone(options));
            tokio::spawn(write_batches(conn, Arc::clone(&jobs)));
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

async fn write_batches(mut conn: WriterConnection, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
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
                None => break,
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
        match conn.get().await {
            Ok(connection) => {
                if !write(connection, batch).await {
                    conn.drop_broken();
                }
            }
            Err(error) => unavailable(batch.into_iter().map(|job| job.done), &error, false),
        }
    }
    conn.close().await;
}

/// Writes `batch` on `conn`, replying to each job; `false` when the database could not
/// be reached through `conn` (every append is told UNAVAILABLE, and the connection is to
/// be opened again).
async fn write(conn: &mut PgConnection, batch: Vec<Job>) -> bool {
    let (appends, replies): (Vec<Append>, Vec<_>) =
        batch.into_iter().map(|job| (job.append, job.done)).unzip();
    match commit(conn, &appends).await {
        Ok(appended) => {
            for ((append, reply), appended) in appends.iter().zip(replies).zip(appended) {
                let _ = reply.send(outcome(append, appended));
            }
        }
        Err(error @ Error::Unavailable(_)) => {
            // The database is out of reach before the commit: one by one would only fail
            // again, once per append. Every feed hears it now and resumes later.
            unavailable(replies, &error, false);
            return false;
        }
        Err(Error::OutcomeUnknown { cause, .. }) => {
            // Lost at the commit: whether the batch is stored, each feed learns when it
            // resumes (Open answers with the position stored).
            let message = cause.to_string();
            for reply in replies {
                let cause = sqlx::Error::Io(std::io::Error::other(message.clone()));
                let _ = reply.send(Err(Error::OutcomeUnknown {
                    retry: RETRY_FEED,
                    cause,
                }));
            }
            return false;
        }
        Err(error) if appends.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
        Err(_) => {
            // Nothing of the batch was stored: alone, each gets its own outcome.
            for (append, reply) in appends.iter().zip(replies) {
                let alone = commit(conn, std::slice::from_ref(append))
                    .await
                    .and_then(|appended| match appended.into_iter().next() {
                        Some(appended) => outcome(append, appended),
                        None => Err(superseded(append.feed_id)),
                    });
                let _ = reply.send(alone);
            }
        }
    }
    true
}

/// What the stream of `append` hears of it.
fn outcome(append: &Append, appended: Appended) -> Result<(), Error> {
    match appended {
        Appended::Stored => Ok(()),
        Appended::Superseded => Err(superseded(append.feed_id)),
        Appended::Refused(error) => Err(error),
    }
}

async fn commit(conn: &mut PgConnection, appends: &[Append]) -> Result<Vec<Appended>, Error> {
    let mut tx = conn.begin().await?;
    let written = append_feeds(&mut tx, appends).await?;
    tx.commit().await.map_err(|e| Error::from(e).at_commit())?;
    metrics::histogram!(crate::metrics::FEED_BATCH_APPENDS).record(appends.len() as f64);
    Ok(written)
}
