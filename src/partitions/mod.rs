//! Time partitioning of sentiments and events (docs/SCALING.md).
//!
//! The migrations make both tables range-partitioned on their timestamp, with a default
//! partition that takes every row. Partitions by time, and dropping them once they are
//! older than the retention, are pg_partman's job: when the extension is in the database
//! (or may be created there), the two tables are registered with it at startup, their
//! settings (premake, retention) are brought up to date, and its maintenance runs
//! ([`maintenance`]): rows that landed in a default partition move into partitions of
//! their own, partitions are made ahead and dropped past the retention. The service
//! repeats that maintenance itself (`--partition-maintenance-seconds`); pg_partman's
//! background worker or a cron job may run it too.
//!
//! Maintenance never stops the service: a failed round is logged with what to do,
//! counted in `krisp_partition_maintenance_total{outcome="failed"}`, and retried, while
//! ingest goes on (rows outside the partitions land in the default partitions meanwhile).
//!
//! Without pg_partman the service works all the same: rows go to the default partitions,
//! no partitions by time are made and no retention is applied. Startup says so.

mod maintenance;

pub use maintenance::{MAINTENANCE_RUNS, Maintenance, maintain};

use anyhow::Context;
use clap::{Args, ValueEnum};
use sqlx::{PgPool, Postgres, Transaction};

/// The partitioned tables and the column each is partitioned on.
pub const PARTITIONED: &[(&str, &str)] = &[("sentiments", "started_at"), ("events", "occurred_at")];

/// Serialises registrations of several replicas starting at once.
const REGISTRATION_LOCK: i64 = 0x6b72_6973_7061_7274; // "krispart"

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PartmanMode {
    /// Use pg_partman when it is in the database; create the extension when it is
    /// installed on the server and this role may create it.
    Auto,
    /// Never use pg_partman: every row goes to the default partitions.
    Off,
}

#[derive(Debug, Clone, Args)]
pub struct PartitionArgs {
    /// Whether to manage time partitions with pg_partman.
    #[arg(long, env = "KRISP_PARTMAN", value_enum, default_value_t = PartmanMode::Auto, global = true)]
    pub partman: PartmanMode,

    /// The time range of one partition of sentiments and events (a PostgreSQL interval:
    /// "1 day", "1 week", "1 hour"). Applies when the tables are first registered with
    /// pg_partman; an existing partition set keeps its interval.
    #[arg(
        long,
        env = "KRISP_PARTITION_INTERVAL",
        default_value = "1 day",
        global = true
    )]
    pub partition_interval: String,

    /// Partitions made ahead of (and, at registration, behind) the current one.
    #[arg(long, env = "KRISP_PARTITION_PREMAKE", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1000), global = true)]
    pub partition_premake: u16,

    /// Drop partitions whose whole range is older than this (a PostgreSQL interval, e.g.
    /// "90 days"). Unset: keep everything.
    #[arg(long, env = "KRISP_RETENTION", global = true)]
    pub retention: Option<String>,

    /// Seconds between the service's own runs of partition maintenance (moving rows out
    /// of the default partitions, making partitions ahead, applying the retention); a
    /// failed run is retried after a minute at most. 0: leave it to pg_partman_bgw or cron.
    #[arg(
        long,
        env = "KRISP_PARTITION_MAINTENANCE_SECONDS",
        default_value_t = 3600,
        global = true
    )]
    pub partition_maintenance_seconds: u64,
}

impl Default for PartitionArgs {
    fn default() -> Self {
        Self {
            partman: PartmanMode::Auto,
            partition_interval: "1 day".into(),
            partition_premake: 4,
            retention: None,
            partition_maintenance_seconds: 3600,
        }
    }
}

/// [`PartitionArgs`] checked against PostgreSQL's reading of the intervals.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub partman: PartmanMode,
    /// The partition interval as PostgreSQL prints it.
    pub interval: String,
    pub premake: u16,
    pub retention: Option<Retention>,
    /// Between the service's own maintenance runs; `None`: it runs none after startup.
    pub maintenance_every: Option<std::time::Duration>,
}

/// How long rows are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// As PostgreSQL prints it (what pg_partman is given).
    pub interval: String,
    /// Its length (a month counts 30 days, as PostgreSQL's epoch of an interval does).
    pub duration: std::time::Duration,
}

impl PartitionArgs {
    /// Checks the intervals (PostgreSQL parses them); an error names the flag.
    pub async fn check(&self, pool: &PgPool) -> anyhow::Result<Settings> {
        let (interval, _) =
            checked_interval(pool, "--partition-interval", &self.partition_interval).await?;
        let retention = match &self.retention {
            Some(retention) => {
                let (interval, seconds) = checked_interval(pool, "--retention", retention).await?;
                Some(Retention {
                    interval,
                    duration: std::time::Duration::from_secs_f64(seconds),
                })
            }
            None => None,
        };
        Ok(Settings {
            partman: self.partman,
            interval,
            premake: self.partition_premake,
            retention,
            maintenance_every: (self.partition_maintenance_seconds > 0)
                .then(|| std::time::Duration::from_secs(self.partition_maintenance_seconds)),
        })
    }
}

/// How sentiments and events are partitioned in this database, as found at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitioning {
    /// pg_partman manages the partitions.
    Partman {
        /// The schema the extension lives in.
        schema: String,
        /// Per table: its partition interval as pg_partman keeps it.
        intervals: Vec<(String, String)>,
        retention: Option<String>,
        /// Whether pg_partman's background worker runs the maintenance of this database.
        worker: bool,
    },
    /// Only the default partitions exist; `reason` says why.
    DefaultOnly { reason: String },
}

impl Partitioning {
    /// Writes the startup log line that says what this means; `own_maintenance`: how
    /// often the service runs the maintenance itself.
    pub fn log(&self, own_maintenance: Option<std::time::Duration>) {
        match self {
            Self::Partman {
                schema,
                intervals,
                retention,
                worker,
            } => {
                tracing::info!(
                    partman_schema = %schema,
                    intervals = ?intervals,
                    retention = retention.as_deref().unwrap_or("none (keep everything)"),
                    "sentiments and events are partitioned by time, managed by pg_partman"
                );
                match (own_maintenance, *worker) {
                    (Some(every), _) => tracing::info!(
                        every = ?every,
                        pg_partman_bgw = worker,
                        "the service runs the partition maintenance itself"
                    ),
                    (None, true) => {
                        tracing::info!("pg_partman_bgw runs the partition maintenance")
                    }
                    (None, false) => tracing::warn!(
                        "nothing maintains the partitions (--partition-maintenance-seconds 0 \
                         and pg_partman_bgw does not maintain this database): schedule \
                         `SELECT {schema}.run_maintenance()` (cron, pg_cron) or set \
                         shared_preload_libraries = 'pg_partman_bgw' and pg_partman_bgw.dbname; \
                         otherwise no partitions are made after the premade ones and new rows \
                         go to the default partitions (docs/SCALING.md)"
                    ),
                }
            }
            Self::DefaultOnly { reason } => tracing::warn!(
                "{reason}: sentiments and events are stored in their default partitions, no \
                 partitions by time are created and no retention is applied. Everything else \
                 works; to partition, install pg_partman 4.x (Debian: postgresql-15-partman) \
                 and run CREATE EXTENSION pg_partman SCHEMA partman, then restart"
            ),
        }
    }
}

/// Registers sentiments and events with pg_partman if it can be used, brings its
/// settings up to date, runs one maintenance, and reports how the tables are
/// partitioned. Runs as the schema owner (after the migrations). Any failure is an
/// error here; the service runs [`settle_and_maintain`] through [`Maintenance`], which
/// logs and counts a failure instead of stopping.
pub async fn configure(pool: &PgPool, args: &PartitionArgs) -> anyhow::Result<Partitioning> {
    settle_and_maintain(pool, &args.check(pool).await?).await
}

/// [`settle`], then [`maintain`] when pg_partman manages the tables.
pub async fn settle_and_maintain(
    pool: &PgPool,
    settings: &Settings,
) -> anyhow::Result<Partitioning> {
    let partitioning = settle(pool, settings).await?;
    if let Partitioning::Partman { schema, .. } = &partitioning {
        maintain(pool, schema).await?;
    }
    Ok(partitioning)
}

/// Registers sentiments and events with pg_partman if it can be used and brings its
/// settings up to date (no maintenance); reports how the tables are partitioned.
pub async fn settle(pool: &PgPool, settings: &Settings) -> anyhow::Result<Partitioning> {
    if settings.partman == PartmanMode::Off {
        return Ok(Partitioning::DefaultOnly {
            reason: "pg_partman is switched off (--partman off)".into(),
        });
    }
    let schema = match partman_schema(pool).await? {
        Some(schema) => schema,
        None => match create_partman(pool).await? {
            Ok(schema) => schema,
            Err(reason) => return Ok(Partitioning::DefaultOnly { reason }),
        },
    };
    let schema_ident = quote_ident(&schema);
    let interval = &settings.interval;
    let retention = settings.retention.as_ref().map(|r| r.interval.clone());

    let mut intervals = Vec::new();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REGISTRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    for (table, column) in PARTITIONED {
        let parent = format!("public.{table}");
        let registered: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {schema_ident}.part_config WHERE parent_table = $1)"
        ))
        .bind(&parent)
        .fetch_one(&mut *tx)
        .await?;
        if !registered {
            take_over(
                &mut tx,
                &schema_ident,
                table,
                column,
                interval,
                settings.premake,
            )
            .await?;
        }
        // Bring the settings up to date; the interval stays what the set was created with.
        let (kept, same): (String, bool) = sqlx::query_as(&format!(
            "UPDATE {schema_ident}.part_config SET premake = $2, retention = $3, \
                 retention_keep_table = false, retention_keep_index = false, \
                 infinite_time_partitions = true \
             WHERE parent_table = $1 \
             RETURNING partition_interval, partition_interval::interval = $4::interval"
        ))
        .bind(&parent)
        .bind(i32::from(settings.premake))
        .bind(&retention)
        .bind(interval)
        .fetch_one(&mut *tx)
        .await?;
        if !same {
            tracing::warn!(
                table,
                kept = %kept,
                requested = %interval,
                "the partition interval of an existing partition set does not change; \
                 keeping the one it was created with"
            );
        }
        intervals.push(((*table).to_owned(), kept));
    }
    tx.commit().await?;
    let worker: bool = sqlx::query_scalar(
        "SELECT current_database() = ANY (string_to_array(replace( \
             coalesce(current_setting('pg_partman_bgw.dbname', true), ''), ' ', ''), ','))",
    )
    .fetch_one(pool)
    .await?;
    Ok(Partitioning::Partman {
        schema,
        intervals,
        retention,
        worker,
    })
}

/// Hands `table` to pg_partman. The migration's default partition (which has taken every
/// row so far) is detached, pg_partman creates the partitions and its own default, and
/// the rows move over into the partitions their time belongs to.
async fn take_over(
    tx: &mut Transaction<'static, Postgres>,
    schema_ident: &str,
    table: &str,
    column: &str,
    interval: &str,
    premake: u16,
) -> anyhow::Result<()> {
    let default = format!("{table}_default");
    let before = format!("{table}_before_partman");
    let attached_default: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table pt \
                        JOIN pg_class d ON d.oid = pt.partdefid \
                        WHERE pt.partrelid = $1::regclass AND d.relname = $2)",
    )
    .bind(format!("public.{table}"))
    .bind(&default)
    .fetch_one(&mut **tx)
    .await?;
    if attached_default {
        sqlx::query(&format!(
            "ALTER TABLE public.{table} DETACH PARTITION public.{default}"
        ))
        .execute(&mut **tx)
        .await?;
        sqlx::query(&format!("ALTER TABLE public.{default} RENAME TO {before}"))
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query(&format!(
        "SELECT {schema_ident}.create_parent(p_parent_table := $1, p_control := $2, \
             p_type := 'native', p_interval := $3, p_premake := $4, p_jobmon := false)"
    ))
    .bind(format!("public.{table}"))
    .bind(column)
    .bind(interval)
    .bind(i32::from(premake))
    .execute(&mut **tx)
    .await
    .with_context(|| format!("pg_partman could not take over {table}"))?;
    if attached_default {
        let moved = sqlx::query(&format!(
            "INSERT INTO public.{table} SELECT * FROM public.{before}"
        ))
        .execute(&mut **tx)
        .await?
        .rows_affected();
        sqlx::query(&format!("DROP TABLE public.{before}"))
            .execute(&mut **tx)
            .await?;
        tracing::info!(table, rows = moved, "registered with pg_partman");
    }
    Ok(())
}

/// The schema pg_partman is installed in, in this database.
async fn partman_schema(db: impl sqlx::PgExecutor<'_>) -> anyhow::Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_extension e \
         JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_partman'",
    )
    .fetch_optional(db)
    .await?)
}

/// Creates the extension in schema `partman` if the server has it and this role may;
/// otherwise says why not.
async fn create_partman(pool: &PgPool) -> anyhow::Result<Result<String, String>> {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await?;
    let available: Option<String> = sqlx::query_scalar(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_partman'",
    )
    .fetch_optional(pool)
    .await?;
    let Some(version) = available else {
        return Ok(Err(format!(
            "pg_partman is not installed on this PostgreSQL server (database {database})"
        )));
    };
    if !version.starts_with("4.") {
        return Ok(Err(format!(
            "the server offers pg_partman {version}; krisp-ingest drives pg_partman 4.x \
             (5.x changed create_parent)"
        )));
    }
    let mut tx = pool.begin().await?;
    // Replicas starting together: one creates the extension, the others then find it.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REGISTRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    if let Some(schema) = partman_schema(&mut *tx).await? {
        return Ok(Ok(schema));
    }
    let created = async {
        sqlx::query("CREATE SCHEMA IF NOT EXISTS partman")
            .execute(&mut *tx)
            .await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman")
            .execute(&mut *tx)
            .await
    }
    .await;
    match created {
        Ok(_) => {
            tx.commit().await?;
            tracing::info!(%version, "created the pg_partman extension in schema partman");
            Ok(Ok("partman".into()))
        }
        Err(error) => Ok(Err(format!(
            "pg_partman {version} is installed on the server but not in database {database}, \
             and could not be created there ({error})"
        ))),
    }
}

/// Checks that `value` is a positive PostgreSQL interval; returns it as PostgreSQL
/// prints it, and its length in seconds.
async fn checked_interval(pool: &PgPool, flag: &str, value: &str) -> anyhow::Result<(String, f64)> {
    let parsed: Result<(String, bool, f64), sqlx::Error> = sqlx::query_as(
        "SELECT $1::interval::text, $1::interval > interval '0', \
                extract(epoch FROM $1::interval)::float8",
    )
    .bind(value)
    .fetch_one(pool)
    .await;
    match parsed {
        Ok((text, true, seconds)) => Ok((text, seconds)),
        Ok((text, false, _)) => anyhow::bail!(
            "{flag} must be a positive interval such as \"1 day\", \"7 days\" or \
             \"1 hour\", not {value:?} ({text})"
        ),
        Err(sqlx::Error::Database(error)) => {
            anyhow::bail!(
                "{flag} {value:?} is not a PostgreSQL interval: {}",
                error.message()
            )
        }
        Err(error) => Err(error.into()),
    }
}

pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
