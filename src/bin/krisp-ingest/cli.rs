//! The command line of `krisp-ingest`. Every flag has an environment variable; the
//! defaults make it work with no configuration at all.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use krisp_ingest::{
    app::{Settings, Tls},
    config::{DatabaseArgs, LimitArgs, LogFormat, SpoolArgs},
};

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

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub spool: SpoolArgs,

    /// Serve a non-loopback address even though no API keys exist (anyone who can reach
    /// it can then read and write). Logged as a warning at startup.
    #[arg(long, env = "KRISP_INSECURE", global = true)]
    pub insecure: bool,

    /// PEM certificate chain for serving gRPC over TLS (with --tls-key).
    #[arg(long, env = "KRISP_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "KRISP_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate: with it, clients must present a certificate it signed (mTLS).
    #[arg(
        long,
        env = "KRISP_TLS_CLIENT_CA",
        global = true,
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Address of the Prometheus metrics endpoint (`GET /metrics`), or `off`.
    #[arg(
        long,
        env = "KRISP_METRICS_LISTEN",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    pub metrics_listen: MetricsListen,

    /// Export traces over OTLP/gRPC to this collector (e.g. `http://127.0.0.1:4317`): a
    /// span for each call (continuing the client's W3C `traceparent`), its service step
    /// and its database work. Off when unset.
    #[arg(long, env = "KRISP_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// With --otlp-endpoint: the share of calls traced (0 to 1) among those whose client
    /// sent no sampled `traceparent` (those are always traced). Each traced call costs
    /// server CPU (docs/BENCHMARKS.md, "Metrics and traces").
    #[arg(
        long,
        env = "KRISP_OTLP_SAMPLE_RATIO",
        default_value_t = 1.0,
        global = true
    )]
    pub otlp_sample_ratio: f64,

    /// Log format on standard error.
    #[arg(long, env = "KRISP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// What `serve` builds the application from; reads the TLS files.
    pub fn serve_settings(&self) -> anyhow::Result<Settings> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Tls {
                certificate_pem: read(cert)?,
                key_pem: read(key)?,
                client_ca_pem: self.tls_client_ca.as_deref().map(read).transpose()?,
            }),
            _ => None,
        };
        Ok(Settings {
            listen: self.listen,
            limits: self.limits.limits()?,
            spool: self.spool.settings(),
            metrics: self.metrics_listen.0,
            insecure: self.insecure,
            tls,
            ..Settings::default()
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve gRPC until SIGINT/SIGTERM (the default).
    Serve,
    /// Apply the pending database migrations and exit.
    Migrate,
    /// Apply the migrations, then grant ROLE exactly what the service needs at run time:
    /// reading and writing its tables, and nothing else (no DDL, TRUNCATE or DROP). Run it
    /// as the database owner; then run the service as ROLE with --skip-migrations.
    GrantRuntimeRole {
        /// An existing PostgreSQL role (lower case letters, digits and _).
        role: String,
    },
    /// Create, revoke or list API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run the demo client: create a user, timezone, session and participation, record a
    /// sentiment and an event, and print them back.
    Demo(ClientArgs),
    /// Simulate a voice service: stream N sentiments for a participation in one stream.
    Feed(FeedArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it, once: it is stored only as a hash.
    Create {
        /// A name for the key (1 to 64 letters, digits, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// What the key may do: ingest (write RPCs), read (get/list/timeline); repeatable.
        #[arg(long = "scope", required = true)]
        scopes: Vec<krisp_ingest::auth::Scope>,
    },
    /// Revoke a key by name (running servers stop accepting it within seconds).
    Revoke {
        #[arg(long)]
        name: String,
    },
    /// List the keys' names, scopes and state (never the keys).
    List,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The krisp-ingest server to call.
    #[arg(long, env = "KRISP_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// API key to send (needed once the server has keys).
    #[arg(long, env = "KRISP_API_KEY")]
    pub api_key: Option<Secret>,
    /// PEM file of the CA that signed the server's certificate: connect over TLS (an
    /// http:// --server is then called over https://).
    #[arg(long, env = "KRISP_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --key-file and --ca-file.
    #[arg(long, env = "KRISP_CERT_FILE", requires_all = ["key_file", "ca_file"])]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "KRISP_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
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
    /// Send them as a resumable live feed (LiveFeed): each batch acknowledged once
    /// committed; after an error the feed is opened again and resumed where the server
    /// says, so nothing is lost or stored twice.
    #[arg(long)]
    pub live: bool,
    /// With --live: milliseconds between batches (0: each as soon as the last is
    /// acknowledged).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
}

/// Where to serve metrics, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|address| Self(Some(address)))
            .map_err(|_| format!("must be an address such as 127.0.0.1:9464, or off; got {s:?}"))
    }
}

/// A secret (an API key) that never shows in `Debug` output or logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    /// Parses `args` as the command line alone: no `KRISP_*` or `DATABASE_URL` from the
    /// environment of whoever runs the tests.
    fn parse(args: &[&str]) -> Cli {
        let command = Cli::command()
            .mut_args(|arg| arg.env(None::<&str>))
            .mut_subcommands(|sub| sub.mut_args(|arg| arg.env(None::<&str>)));
        let matches = command.get_matches_from(args);
        Cli::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn cli_parses() {
        Cli::command().debug_assert();
    }

    #[test]
    fn default_limits_match_the_flags() {
        let cli = parse(&["krisp-ingest"]);
        assert_eq!(
            cli.limits.limits().unwrap(),
            krisp_ingest::config::Limits::default()
        );
    }

    #[test]
    fn default_spool_settings_match_the_flags() {
        let cli = parse(&["krisp-ingest"]);
        assert_eq!(
            cli.spool.settings(),
            krisp_ingest::storage::SpoolSettings::default()
        );
    }

    #[test]
    fn default_partition_args_match_the_flags() {
        let flags = parse(&["krisp-ingest"]).database.partitions;
        let defaults = krisp_ingest::partitions::PartitionArgs::default();
        assert_eq!(flags.partman, defaults.partman);
        assert_eq!(flags.partition_interval, defaults.partition_interval);
        assert_eq!(flags.partition_premake, defaults.partition_premake);
        assert_eq!(flags.retention, defaults.retention);
        assert_eq!(
            flags.partition_maintenance_seconds,
            defaults.partition_maintenance_seconds
        );
    }

    #[test]
    fn the_connection_age_grace_covers_the_longest_stream_unless_set() {
        let cli = parse(&["krisp-ingest", "--max-stream-seconds", "900"]);
        let limits = cli.limits.limits().unwrap();
        assert_eq!(
            limits.max_connection_age_grace,
            std::time::Duration::from_secs(900)
        );
        let cli = parse(&[
            "krisp-ingest",
            "--max-stream-seconds",
            "900",
            "--max-connection-age-grace-seconds",
            "60",
        ]);
        let limits = cli.limits.limits().unwrap();
        assert_eq!(
            limits.max_connection_age_grace,
            std::time::Duration::from_secs(60)
        );
        let cli = parse(&["krisp-ingest", "--max-connection-age-seconds", "0"]);
        assert_eq!(cli.limits.limits().unwrap().max_connection_age, None);
    }
}
