//! Partition maintenance: rows that landed in a default partition (their time had no
//! partition yet) move into partitions of their own, partitions are made ahead, and
//! those past the retention are dropped. A failed round never stops the service: it is
//! logged with what to do, counted, and retried.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use super::{
    PARTITIONED, Partitioning, REGISTRATION_LOCK, Settings, quote_ident, settle,
    settle_and_maintain,
};

/// `krisp_partition_maintenance_total{outcome="ok"|"failed"}`: maintenance rounds.
pub const MAINTENANCE_RUNS: &str = "krisp_partition_maintenance_total";
/// `krisp_partition_rows_moved_total{table}`: rows moved out of a default partition.
pub const ROWS_MOVED: &str = "krisp_partition_rows_moved_total";
/// `krisp_partition_maintenance_last_success_seconds`: Unix time of the last good round.
pub const LAST_SUCCESS: &str = "krisp_partition_maintenance_last_success_seconds";

/// How long maintenance waits for a lock before it gives up and retries later. New
/// writes queue behind a waiting DDL lock request, so the wait is kept short.
const LOCK_TIMEOUT: &str = "2s";
/// Partition intervals' worth of rows moved per transaction.
const MOVE_BATCH: i32 = 8;
/// Transactions of moving per table and round at most; the next round goes on.
const MOVES_PER_ROUND: usize = 1000;
/// A failed round is retried after this long at most.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Runs pg_partman's maintenance of sentiments and events now: first moves the rows of
/// each default partition into partitions of their time (creating them), then makes
/// partitions ahead and drops those past the retention. Returns the rows moved per table.
///
/// Each step is its own short transaction with a lock timeout, under the lock that
/// serialises registrations, so replicas never run it on one table at once.
pub async fn maintain(pool: &PgPool, schema: &str) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let schema_ident = quote_ident(schema);
    let mut moved = Vec::new();
    for (table, _) in PARTITIONED {
        let parent = format!("public.{table}");
        let mut rows = 0;
        for _ in 0..MOVES_PER_ROUND {
            let batch: i64 = locked_step(
                pool,
                &format!(
                    "SELECT {schema_ident}.partition_data_time(p_parent_table := $1, \
                         p_batch_count := {MOVE_BATCH}, p_analyze := false)"
                ),
                &parent,
            )
            .await
            .with_context(|| {
                format!("moving the rows of {table}_default into partitions of their own failed")
            })?;
            let batch = u64::try_from(batch).context("pg_partman moved a negative row count")?;
            if batch == 0 {
                break;
            }
            // Counted as they go: the progress of a long move shows in the metrics.
            metrics::counter!(ROWS_MOVED, "table" => *table).increment(batch);
            rows += batch;
        }
        if rows > 0 {
            tracing::info!(table, rows, "moved rows out of the default partition");
        }
        locked_step::<()>(
            pool,
            &format!(
                "SELECT {schema_ident}.run_maintenance(p_parent_table := $1, p_jobmon := false)"
            ),
            &parent,
        )
        .await
        .with_context(|| format!("pg_partman maintenance of {table} failed"))?;
        moved.push((*table, rows));
    }
    Ok(moved)
}

/// Runs `statement` (with `parent` as $1) in a transaction of its own that waits at most
/// [`LOCK_TIMEOUT`] for any lock.
async fn locked_step<T>(pool: &PgPool, statement: &str, parent: &str) -> anyhow::Result<T>
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REGISTRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    let out: T = sqlx::query_scalar(statement)
        .bind(parent)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(out)
}

/// The service's own partition maintenance, as the schema owner.
#[derive(Debug, Clone)]
pub struct Maintenance {
    pool: PgPool,
    settings: Settings,
}

impl Maintenance {
    pub fn new(pool: PgPool, settings: Settings) -> Self {
        Self { pool, settings }
    }

    /// Registration and settings only ([`settle`]): what a start does before it serves
    /// (one short transaction once the tables are registered). A failure is logged; only
    /// whole rounds are counted (the background round after it settles again); `None`
    /// when it failed.
    pub async fn settle_once(&self) -> Option<Partitioning> {
        settle(&self.pool, &self.settings)
            .await
            .map_err(|error| self.log_failure(&error))
            .ok()
    }

    /// One round: registration and settings ([`settle`]), then [`maintain`]. Its outcome
    /// is logged and counted; `None` when it failed.
    pub async fn run_once(&self) -> Option<Partitioning> {
        match settle_and_maintain(&self.pool, &self.settings).await {
            Ok(partitioning) => {
                metrics::counter!(MAINTENANCE_RUNS, "outcome" => "ok").increment(1);
                if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
                {
                    metrics::gauge!(LAST_SUCCESS).set(now.as_secs_f64());
                }
                Some(partitioning)
            }
            Err(error) => {
                metrics::counter!(MAINTENANCE_RUNS, "outcome" => "failed").increment(1);
                self.log_failure(&error);
                None
            }
        }
    }

    fn log_failure(&self, error: &anyhow::Error) {
        tracing::error!(
                    error = %format!("{error:#}"),
                    retry_in = ?self.retry_after(),
                    "partition maintenance failed. Ingest goes on: rows dated outside the \
                     partitions wait in the default partitions until a round succeeds. If it \
                     keeps failing, look for long transactions holding locks on sentiments or \
                     events (pg_locks, pg_stat_activity), check that this role owns them, and \
                     run `SELECT * FROM partman.check_default(false)` (docs/SCALING.md, \
                     \"Partition maintenance\")"
        );
    }

    fn retry_after(&self) -> Duration {
        self.settings
            .maintenance_every
            .map_or(RETRY_AFTER, |every| every.min(RETRY_AFTER))
    }

    /// Runs [`Self::run_once`] in the background now, then every
    /// `--partition-maintenance-seconds` (sooner after a failure) until the process ends;
    /// only the first round when that is 0 or pg_partman is switched off. The service
    /// serves meanwhile: a first round that moves many rows out of a default partition
    /// (in short transactions of [`MOVE_BATCH`] intervals each) takes as long as it takes.
    pub fn spawn(self) {
        tokio::spawn(async move {
            let first = self.run_once().await;
            let Some(every) = self.settings.maintenance_every else {
                return;
            };
            if self.settings.partman == super::PartmanMode::Off {
                return;
            }
            let mut failed = first.is_none();
            loop {
                let wait = if failed { self.retry_after() } else { every };
                tokio::time::sleep(wait).await;
                failed = self.run_once().await.is_none();
            }
        });
    }
}
