//! Time partitioning of sentiments and events (docs/SCALING.md).
//!
//! The migrations make both tables range-partitioned on their timestamp, with a default
//! partition that takes every row. Partitions by time, and dropping them once they are
//! older than the retention, are pg_partman's job: when the extension is in the database
//! (or may be created there), the two tables are registered with it at startup, their
//! settings (premake, retention) are brought up to date, and its maintenance runs once.
//! Scheduling that maintenance afterwards is pg_partman's too (its background worker,
//! `pg_partman_bgw`, or a cron job calling `partman.run_maintenance()`).
//!
//! Without pg_partman the service works all the same: rows go to the default partitions,
//! no partitions by time are made and no retention is applied. Startup says so.

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
}

impl Default for PartitionArgs {
    fn default() -> Self {
        Self {
            partman: PartmanMode::Auto,
            partition_interval: "1 day".into(),
            partition_premake: 4,
            retention: None,
        }
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
    /// Writes the startup log line that says what this means.
    pub fn log(&self) {
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
                if !worker {
                    tracing::warn!(
                        "pg_partman_bgw does not maintain this database: schedule \
                         `SELECT {schema}.run_maintenance()` (cron, pg_cron) or set \
                         shared_preload_libraries = 'pg_partman_bgw' and pg_partman_bgw.dbname; \
                         otherwise no partitions are made after the premade ones and new rows \
                         go to the default partitions (docs/SCALING.md)"
                    );
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

/// Registers sentiments and events with pg_partman if it can be used, and reports how
/// they are partitioned. Runs as the schema owner (after the migrations).
pub async fn configure(pool: &PgPool, args: &PartitionArgs) -> anyhow::Result<Partitioning> {
    let interval = checked_interval(pool, "--partition-interval", &args.partition_interval).await?;
    let retention = match &args.retention {
        Some(retention) => Some(checked_interval(pool, "--retention", retention).await?),
        None => None,
    };
    if args.partman == PartmanMode::Off {
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
            register(&mut tx, &schema_ident, table, column, &interval, args).await?;
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
        .bind(i32::from(args.partition_premake))
        .bind(&retention)
        .bind(&interval)
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
    run_maintenance(pool, &schema).await?;
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

/// Runs pg_partman's maintenance for our tables now: makes partitions ahead, drops
/// those past the retention.
pub async fn run_maintenance(pool: &PgPool, schema: &str) -> anyhow::Result<()> {
    let schema_ident = quote_ident(schema);
    for (table, _) in PARTITIONED {
        sqlx::query(&format!(
            "SELECT {schema_ident}.run_maintenance(p_parent_table := $1, p_jobmon := false)"
        ))
        .bind(format!("public.{table}"))
        .execute(pool)
        .await
        .with_context(|| format!("pg_partman maintenance of {table} failed"))?;
    }
    Ok(())
}

/// Hands `table` to pg_partman. The migration's default partition (which has taken every
/// row so far) is detached, pg_partman creates the partitions and its own default, and
/// the rows move over into the partitions their time belongs to.
async fn register(
    tx: &mut Transaction<'static, Postgres>,
    schema_ident: &str,
    table: &str,
    column: &str,
    interval: &str,
    args: &PartitionArgs,
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
    .bind(i32::from(args.partition_premake))
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
/// prints it.
async fn checked_interval(pool: &PgPool, flag: &str, value: &str) -> anyhow::Result<String> {
    let parsed: Result<(String, bool), sqlx::Error> =
        sqlx::query_as("SELECT $1::interval::text, $1::interval > interval '0'")
            .bind(value)
            .fetch_one(pool)
            .await;
    match parsed {
        Ok((text, true)) => Ok(text),
        Ok((text, false)) => anyhow::bail!(
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

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
