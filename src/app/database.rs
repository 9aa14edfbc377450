//! The database the service runs against: DATABASE_URL or the local cluster, the
//! migrations, and the time partitions' maintenance.

use std::time::Duration;

use anyhow::Context;
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::{
    config::DatabaseArgs,
    local_postgres::{self, LocalPostgres},
    storage,
};

/// The service's pool settings for a service of `max_connections` database connections
/// in all: the health probe keeps one of its own (`Storage::health_probe`), the live
/// feeds five (`storage::FEED_CONNECTIONS`), the unary writers four
/// (`storage::UNARY_CONNECTIONS`); the pool holds the rest (at least one). Connections
/// are not pinged before each use: that would add a round trip to every unary call
/// (docs/BENCHMARKS.md, "What shaped the code"); a connection found broken fails its call with
/// UNAVAILABLE and is replaced.
///
/// Every connection of the service keeps PostgreSQL's default choice between a
/// statement's generic plan and one made for its parameters: Citus can build some
/// statements only with their parameters' values, and forcing generic plans made them fail
/// there (docs/decisions/0001-plans-chosen-by-postgresql.md). A generic plan that reads a
/// partitioned table also locks every partition when it starts (PostgreSQL 15), even those
/// its parameters rule out; with a year of daily partitions, 16 timelines at once with
/// generic plans ran out of the lock table ("out of shared memory").
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(
            max_connections
                .saturating_sub(storage::OWN_CONNECTIONS)
                .max(1),
        )
        .acquire_timeout(Duration::from_secs(5))
        // A round trip for every connection taken costs the busy path; a connection idle
        // for a while is tested instead (a database restarted meanwhile has closed it,
        // and the call that drew it would fail although the database is back).
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for <= storage::IDLE_CHECK {
                    return Ok(true);
                }
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
}

/// The database the service runs against, and the local cluster behind it, if any.
pub struct Database {
    pub pool: PgPool,
    pub local: Option<LocalPostgres>,
    /// How long rows are kept (--retention), if not for ever.
    pub retention: Option<Duration>,
    /// The partition maintenance this process runs (as the schema owner).
    maintenance: Option<crate::partitions::Maintenance>,
}

impl Database {
    /// Connects to DATABASE_URL, or starts (or reuses) the local cluster when it is unset,
    /// and applies the migrations.
    pub async fn connect(args: &DatabaseArgs) -> anyhow::Result<Self> {
        let pool_options = pool_options(args.max_connections);
        let (pool, local) = match &args.database_url {
            Some(url) => {
                tracing::info!(database = %url.redacted(), "using DATABASE_URL");
                let pool = pool_options.connect(url.expose()).await.with_context(|| {
                    format!(
                        "cannot connect to DATABASE_URL ({}); check that the server runs and \
                         accepts this user, or unset DATABASE_URL to use a local cluster",
                        url.redacted()
                    )
                })?;
                (pool, None)
            }
            None => {
                let data_dir = args
                    .data_dir
                    .clone()
                    .unwrap_or_else(local_postgres::default_data_dir);
                let local = LocalPostgres::ensure(&data_dir).await?;
                let pool = pool_options
                    .connect_with(local.connect_options(local_postgres::DATABASE))
                    .await
                    .context("cannot connect to the local PostgreSQL")?;
                (pool, Some(local))
            }
        };
        if args.skip_migrations {
            // Running as a role that may not change the schema: only check it.
            storage::check_migrated(&pool).await?;
            tracing::info!(
                "time partitions are left to the schema owner (--skip-migrations): \
                 `krisp-ingest migrate` registers them with pg_partman"
            );
        } else {
            storage::migrate(&pool)
                .await
                .context("cannot apply the database migrations")?;
        }
        let settings = args.partitions.check(&pool).await?;
        let retention = settings.retention.as_ref().map(|r| r.duration);
        let maintenance = if args.skip_migrations {
            None
        } else {
            // Registration and settings now; the rounds that move rows and make
            // partitions run in the background once serving (`maintain_partitions`). A
            // failure is logged and counted, it never stops the service.
            let maintenance = crate::partitions::Maintenance::new(pool.clone(), settings.clone());
            if let Some(partitioning) = maintenance.settle_once().await {
                partitioning.log(settings.maintenance_every);
            }
            Some(maintenance)
        };
        Ok(Self {
            pool,
            local,
            retention,
            maintenance,
        })
    }

    /// Closes the pool, and stops the local cluster if this process started it (one found
    /// running is left running).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        match self.local {
            Some(local) if local.started_here() => local.stop().await,
            _ => Ok(()),
        }
    }

    /// One maintenance round now, waited for (the commands that do not serve).
    pub async fn maintain_now(&self) {
        if let Some(maintenance) = &self.maintenance {
            maintenance.run_once().await;
        }
    }

    /// Keeps maintaining the time partitions in the background while the process runs
    /// (when this process owns the schema; see `--partition-maintenance-seconds`).
    pub fn maintain_partitions(&self) {
        if let Some(maintenance) = &self.maintenance {
            maintenance.clone().spawn();
        }
    }
}
