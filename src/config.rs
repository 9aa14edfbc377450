//! Command line and environment. Every flag has an environment variable; the defaults
//! make `krisp-ingest` work with no configuration at all.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "krisp-ingest",
    version,
    about = "gRPC ingestion service for call analytics"
)]
pub struct Cli {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Address to serve gRPC on (serve). Port 0 picks a free port, printed at startup.
    #[arg(
        long,
        env = "KRISP_LISTEN",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen: SocketAddr,

    /// Seconds in-flight calls get to finish after SIGINT/SIGTERM before they are cancelled
    /// (their transactions then roll back).
    #[arg(
        long,
        env = "KRISP_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub shutdown_grace_seconds: u64,

    /// Log format on standard error.
    #[arg(long, env = "KRISP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve gRPC until SIGINT/SIGTERM (the default).
    Serve,
    /// Apply the pending database migrations and exit.
    Migrate,
    /// Run the demo client: create a user, timezone, session and participation, record a
    /// sentiment and an event, and print them back.
    Demo(ClientArgs),
    /// Simulate a voice service: stream N sentiments for a participation in one stream.
    Feed(FeedArgs),
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

    /// Maximum number of database connections in the pool.
    #[arg(
        long,
        env = "KRISP_DB_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The krisp-ingest server to call.
    #[arg(long, env = "KRISP_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
}

#[derive(Debug, Clone, Args)]
pub struct FeedArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The participation to stream sentiments for; a fresh one is created when omitted.
    #[arg(long)]
    pub participation_id: Option<String>,
    /// How many sentiments to stream.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Sentiments per stream message.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
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
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
