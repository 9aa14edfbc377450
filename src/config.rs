//! The service's configuration as flags and environment variables (the groups the
//! command line of `krisp-ingest` flattens in): limits and database. Every flag has an
//! environment variable; the defaults make `krisp-ingest` work with no configuration.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use chrono::TimeDelta;
use clap::{Args, ValueEnum};

use crate::domain::ItemClock;
use crate::storage::SpoolSettings;

/// The server's limits (docs/GUARANTEES.md says what a client sees at each).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest request message accepted, in bytes (RESOURCE_EXHAUSTED above it).
    #[arg(long, env = "KRISP_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, global = true)]
    pub max_message_bytes: usize,

    /// Most items one client stream may carry (RESOURCE_EXHAUSTED above it; nothing stored).
    #[arg(
        long,
        env = "KRISP_MAX_STREAM_ITEMS",
        default_value_t = 10_000_000,
        global = true
    )]
    pub max_stream_items: u64,

    /// Longest a client stream may stay open, in seconds (RESOURCE_EXHAUSTED past it;
    /// nothing stored). An open stream holds no database connection: its items wait in
    /// the spool (--spool-*).
    #[arg(
        long,
        env = "KRISP_MAX_STREAM_SECONDS",
        default_value_t = 4 * 3600,
        global = true
    )]
    pub max_stream_seconds: u64,

    /// Milliseconds the client of a stream being written as it arrives (a bulk upload)
    /// may stay silent before the stream gives its database connection back and spools
    /// the rest until its trailer.
    #[arg(
        long,
        env = "KRISP_STREAM_WRITER_IDLE_MS",
        default_value_t = 1000,
        global = true
    )]
    pub stream_writer_idle_ms: u64,

    /// Unary and server-streaming calls served at once; more are refused with
    /// RESOURCE_EXHAUSTED and RetryInfo.
    #[arg(
        long,
        env = "KRISP_MAX_CONCURRENT_CALLS",
        default_value_t = 512,
        global = true
    )]
    pub max_concurrent_calls: usize,

    /// Client streams open at once (live feeds, uploads); more are refused with
    /// RESOURCE_EXHAUSTED and RetryInfo.
    #[arg(
        long,
        env = "KRISP_MAX_OPEN_STREAMS",
        default_value_t = 20_000,
        global = true
    )]
    pub max_open_streams: usize,

    /// Seconds between HTTP/2 keepalive pings to each client.
    #[arg(
        long,
        env = "KRISP_KEEPALIVE_INTERVAL_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub keepalive_interval_seconds: u64,

    /// Seconds a client has to answer a keepalive ping before its connection (and any
    /// stream on it) is dropped.
    #[arg(
        long,
        env = "KRISP_KEEPALIVE_TIMEOUT_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub keepalive_timeout_seconds: u64,

    /// Seconds in-flight calls get to finish after SIGINT/SIGTERM; streams still open then
    /// are rolled back with UNAVAILABLE.
    #[arg(
        long,
        env = "KRISP_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub shutdown_grace_seconds: u64,

    /// Seconds after which a client connection is asked to go away (HTTP/2 GOAWAY), so
    /// that long-lived connections spread again over the replicas; 0: never. Calls in
    /// flight then get --max-connection-age-grace-seconds to finish.
    #[arg(
        long,
        env = "KRISP_MAX_CONNECTION_AGE_SECONDS",
        default_value_t = 1800,
        global = true
    )]
    pub max_connection_age_seconds: u64,

    /// Each replica picks its connection age at random within this many percent of
    /// --max-connection-age-seconds, so that replicas started together do not recycle
    /// their connections together.
    #[arg(
        long,
        env = "KRISP_MAX_CONNECTION_AGE_JITTER_PERCENT",
        default_value_t = 10,
        value_parser = clap::value_parser!(u8).range(0..=50),
        global = true
    )]
    pub max_connection_age_jitter_percent: u8,

    /// Seconds the calls of a connection past its age get before it is closed; streams
    /// still open then store nothing. Default: --max-stream-seconds, so that no stream
    /// within its limit is cut; shorter rebalances sooner (docs/SCALING.md).
    #[arg(long, env = "KRISP_MAX_CONNECTION_AGE_GRACE_SECONDS", global = true)]
    pub max_connection_age_grace_seconds: Option<u64>,

    /// How far ahead of the server's clock an item's time may be, in seconds (devices'
    /// clocks are skewed). Later items are refused with a field violation naming them.
    #[arg(
        long,
        env = "KRISP_MAX_FUTURE_SKEW_SECONDS",
        default_value_t = ItemClock::DEFAULT_MAX_FUTURE_SECONDS,
        global = true
    )]
    pub max_future_skew_seconds: u64,

    /// How old an item's time may be, in seconds; unset: any age. With --retention, at
    /// most the retention (older rows would be dropped at the next maintenance).
    #[arg(long, env = "KRISP_MAX_ITEM_AGE_SECONDS", global = true)]
    pub max_item_age_seconds: Option<u64>,
}

impl LimitArgs {
    pub fn limits(&self) -> anyhow::Result<Limits> {
        let seconds = Duration::from_secs;
        let grace = self
            .max_connection_age_grace_seconds
            .unwrap_or(self.max_stream_seconds);
        Ok(Limits {
            max_message_bytes: self.max_message_bytes,
            max_stream_items: self.max_stream_items,
            max_stream_duration: seconds(self.max_stream_seconds),
            stream_writer_idle: Duration::from_millis(self.stream_writer_idle_ms.max(1)),
            max_concurrent_calls: self.max_concurrent_calls.max(1),
            max_open_streams: self.max_open_streams.max(1),
            keepalive_interval: seconds(self.keepalive_interval_seconds.max(1)),
            keepalive_timeout: seconds(self.keepalive_timeout_seconds.max(1)),
            shutdown_grace: seconds(self.shutdown_grace_seconds),
            max_connection_age: (self.max_connection_age_seconds > 0)
                .then(|| seconds(self.max_connection_age_seconds)),
            max_connection_age_jitter_percent: self.max_connection_age_jitter_percent,
            max_connection_age_grace: seconds(grace),
            item_clock: ItemClock {
                max_future: delta(self.max_future_skew_seconds)?,
                max_age: self.max_item_age_seconds.map(delta).transpose()?,
            },
        })
    }
}

fn delta(seconds: u64) -> anyhow::Result<TimeDelta> {
    i64::try_from(seconds)
        .ok()
        .and_then(TimeDelta::try_seconds)
        .ok_or_else(|| anyhow::anyhow!("{seconds} seconds is too long a time"))
}

/// `age` moved by up to `percent` percent either way, `random` (0.0..1.0) saying where.
pub fn jittered(age: Duration, percent: u8, random: f64) -> Duration {
    let spread = f64::from(percent.min(100)) / 100.0;
    age.mul_f64(1.0 - spread + 2.0 * spread * random.clamp(0.0, 1.0))
}

/// The server's limits, as the application uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_stream_items: u64,
    pub max_stream_duration: Duration,
    pub stream_writer_idle: Duration,
    pub max_concurrent_calls: usize,
    pub max_open_streams: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Before jitter; `None`: connections never age out.
    pub max_connection_age: Option<Duration>,
    pub max_connection_age_jitter_percent: u8,
    pub max_connection_age_grace: Duration,
    /// How far from the server's clock item times may lie.
    pub item_clock: ItemClock,
}

impl Limits {
    /// Items may be no older than `retention`: older ones would be dropped at the next
    /// partition maintenance.
    pub fn within_retention(mut self, retention: Option<Duration>) -> Self {
        if let Some(retention) = retention.and_then(|r| TimeDelta::from_std(r).ok()) {
            let age = self
                .item_clock
                .max_age
                .map_or(retention, |age| age.min(retention));
            self.item_clock.max_age = Some(age);
        }
        self
    }
}

impl Default for Limits {
    fn default() -> Self {
        let seconds = Duration::from_secs;
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_stream_items: 10_000_000,
            max_stream_duration: seconds(4 * 3600),
            stream_writer_idle: Duration::from_millis(1000),
            max_concurrent_calls: 512,
            max_open_streams: 20_000,
            keepalive_interval: seconds(30),
            keepalive_timeout: seconds(10),
            shutdown_grace: seconds(10),
            max_connection_age: Some(seconds(1800)),
            max_connection_age_jitter_percent: 10,
            max_connection_age_grace: seconds(4 * 3600),
            item_clock: ItemClock::default(),
        }
    }
}

/// Where open streams keep their items until they are written, and how much.
#[derive(Debug, Clone, Args)]
pub struct SpoolArgs {
    /// Directory for the spill files of open streams (each server uses a directory of
    /// its own inside it, and removes those of servers that are gone when it starts).
    /// Default: the system's temporary directory.
    #[arg(long, env = "KRISP_SPOOL_DIR", global = true)]
    pub spool_dir: Option<PathBuf>,

    /// Bytes of items all open streams together keep in memory; past it they spill to
    /// disk at once.
    #[arg(long, env = "KRISP_SPOOL_MEMORY_BYTES", default_value_t = 512 << 20, global = true)]
    pub spool_memory_bytes: u64,

    /// Bytes all spill files together may hold; a stream that needs more is refused with
    /// RESOURCE_EXHAUSTED and RetryInfo, nothing stored.
    #[arg(long, env = "KRISP_SPOOL_DISK_BYTES", default_value_t = 8 << 30, global = true)]
    pub spool_disk_bytes: u64,

    /// Bytes of items one stream may carry (RESOURCE_EXHAUSTED above it; nothing stored).
    #[arg(long, env = "KRISP_MAX_STREAM_BYTES", default_value_t = 2 << 30, global = true)]
    pub max_stream_bytes: u64,
}

impl SpoolArgs {
    pub fn settings(&self) -> SpoolSettings {
        let default = SpoolSettings::default();
        SpoolSettings {
            dir: self.spool_dir.clone().unwrap_or(default.dir),
            memory_bytes: self.spool_memory_bytes,
            disk_bytes: self.spool_disk_bytes,
            max_stream_bytes: self.max_stream_bytes,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL to use, e.g. postgres://user:pass@host:5432/db. When unset, a local
    /// cluster is started (or reused) in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<DatabaseUrl>,

    /// Data directory of the local cluster used when DATABASE_URL is unset. Default:
    /// $XDG_DATA_HOME/krisp-ingest/postgres (~/.local/share/...), or
    /// /var/lib/krisp-ingest/postgres when running as root.
    #[arg(long, env = "KRISP_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Do not apply migrations at startup; only check that the database has them all.
    /// For running as a role without DDL rights (see `grant-runtime-role`).
    #[arg(long, env = "KRISP_SKIP_MIGRATIONS", global = true)]
    pub skip_migrations: bool,

    /// Database connections the service opens at most: the health probe's 1, the live
    /// feeds' 5, the unary records' writers' 4, and the pool (the rest). Client streams
    /// write with at most three quarters of the pool and hold none while they wait for
    /// their clients.
    #[arg(
        long,
        env = "KRISP_DB_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub max_connections: u32,

    #[command(flatten)]
    pub partitions: crate::partitions::PartitionArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A database URL whose password never shows in `Debug` output or logs.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let credentials = &self.0[scheme + 3..at];
                match credentials.find(':') {
                    Some(colon) => format!(
                        "{}{}:***{}",
                        &self.0[..scheme + 3],
                        &credentials[..colon],
                        &self.0[at..]
                    ),
                    None => self.0.clone(),
                }
            }
            _ => self.0.clone(),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Self(s.to_owned()))
        } else {
            Err("must start with postgres:// or postgresql://".to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_debug() {
        let url: DatabaseUrl = "postgres://app:s3cret@db:5432/krisp"
            .parse()
            .unwrap_or_else(|_| DatabaseUrl(String::new()));
        let shown = format!("{url:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@db:5432/krisp"), "{shown}");
    }

    #[test]
    fn connection_ages_are_jittered_within_the_percentage() {
        let age = Duration::from_secs(1000);
        assert_eq!(jittered(age, 10, 0.0), Duration::from_secs(900));
        assert_eq!(jittered(age, 10, 0.5), Duration::from_secs(1000));
        assert_eq!(jittered(age, 10, 1.0), Duration::from_secs(1100));
        assert_eq!(jittered(age, 0, 0.9), age);
    }
}
