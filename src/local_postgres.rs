//! The zero-configuration database: a PostgreSQL cluster of our own in a data directory
//! that survives restarts, started (or reused) with the server binaries found on this
//! machine. It listens on a Unix socket inside its data directory only, so it never
//! competes for a TCP port with another PostgreSQL.
//!
//! PostgreSQL refuses to run as root; when we are root, the cluster is owned and run by
//! the `postgres` system user (or `nobody`), and we connect to it as root over its socket.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use sqlx::{ConnectOptions, Connection, PgConnection, postgres::PgConnectOptions};
use tokio::process::Command;

/// The database the service uses inside the local cluster.
pub const DATABASE: &str = "krisp_ingest";
/// The superuser initdb creates.
const SUPERUSER: &str = "postgres";

/// A running local cluster.
#[derive(Debug)]
pub struct LocalPostgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<nix::unistd::User>,
    started_here: bool,
}

/// The default data directory: per user, or system-wide when running as root.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/krisp-ingest/postgres");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| std::env::temp_dir().join("krisp-ingest-data"));
    base.join("krisp-ingest/postgres")
}

/// Where distributions put the server binaries when they are not on PATH.
fn candidate_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    let mut versioned = Vec::new();
    for (parent, prefix) in [
        ("/usr/lib/postgresql", ""), // Debian, Ubuntu: /usr/lib/postgresql/15/bin
        ("/usr", "pgsql-"),          // RHEL, Fedora (PGDG): /usr/pgsql-15/bin
        ("/opt/homebrew/opt", "postgresql@"),
        ("/usr/local/opt", "postgresql@"),
    ] {
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(version) = name.strip_prefix(prefix)
                && let Ok(major) = version.split('.').next().unwrap_or("").parse::<u32>()
            {
                versioned.push((major, entry.path().join("bin")));
            }
        }
    }
    // Newest major version first.
    versioned.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    dirs.extend(versioned.into_iter().map(|(_, dir)| dir));
    dirs.extend(["/usr/local/pgsql/bin", "/usr/lib/postgresql/bin"].map(PathBuf::from));
    dirs
}

/// The first directory holding `initdb`, `pg_ctl` and `postgres` together.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    candidate_bin_dirs()
        .into_iter()
        .find(|dir| {
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|b| dir.join(b).is_file())
        })
        .ok_or_else(|| {
            anyhow!(
                "no PostgreSQL server binaries (initdb, pg_ctl, postgres) were found on PATH or in \
                 /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin or Homebrew's postgresql@*.\n\
                 Either install them (Debian/Ubuntu: `apt-get install postgresql`; Fedora/RHEL: \
                 `dnf install postgresql-server`; macOS: `brew install postgresql@15`), or set \
                 DATABASE_URL to an existing PostgreSQL, e.g. \
                 DATABASE_URL=postgres://postgres@127.0.0.1:5432/krisp_ingest"
            )
        })
}

/// PostgreSQL will not run as root: pick the system user that owns and runs the cluster.
fn unprivileged_user() -> anyhow::Result<Option<nix::unistd::User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in [SUPERUSER, "nobody"] {
        if let Some(user) = nix::unistd::User::from_name(name)? {
            return Ok(Some(user));
        }
    }
    bail!(
        "running as root, and PostgreSQL refuses to run as root, but there is neither a \
         `postgres` nor a `nobody` user to run it as; create one (`useradd --system postgres`) \
         or set DATABASE_URL"
    )
}

fn describe(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.trim().is_empty() {
        text.push('\n');
        text.push_str(stdout.trim());
    }
    text
}

impl LocalPostgres {
    /// Makes sure a cluster runs in `data_dir` (creating it on first use) and that the
    /// service's database exists in it. Safe to call from several processes at once.
    pub async fn ensure(data_dir: &Path) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        let run_as = unprivileged_user()?;
        let data_dir = absolute(data_dir)?;
        let parent = data_dir
            .parent()
            .ok_or_else(|| anyhow!("data directory {} has no parent", data_dir.display()))?;
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;

        // One process at a time initialises and starts the cluster.
        let lock_path = data_dir.with_extension("lock");
        let lock = File::create(&lock_path)
            .with_context(|| format!("cannot create lock file {}", lock_path.display()))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await?
            .with_context(|| format!("cannot lock {}", lock_path.display()))?;

        let mut cluster = Self {
            data_dir,
            bin_dir,
            run_as,
            started_here: false,
        };
        cluster.init_if_needed().await?;
        cluster.start_if_stopped().await?;
        cluster.create_database().await?;
        drop(lock);
        Ok(cluster)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this process started the cluster (rather than finding it running).
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// Options to connect to `database` in this cluster over its Unix socket.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.data_dir)
            .port(5432)
            .username(SUPERUSER)
            .database(database)
            .application_name("krisp-ingest")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command
            .current_dir("/")
            .env("LC_ALL", "C")
            .kill_on_drop(false);
        if let Some(user) = &self.run_as {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        command
    }

    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(program)
            .args(args)
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.bin_dir.join(program).display()))
    }

    fn data_dir_arg(&self) -> anyhow::Result<&str> {
        self.data_dir
            .to_str()
            .ok_or_else(|| anyhow!("data directory {} is not UTF-8", self.data_dir.display()))
    }

    async fn init_if_needed(&self) -> anyhow::Result<()> {
        if self.data_dir.join("PG_VERSION").is_file() {
            return Ok(());
        }
        if fs::read_dir(&self.data_dir).is_ok_and(|mut d| d.next().is_some()) {
            bail!(
                "{} exists and is not empty, but holds no PostgreSQL cluster; remove it or \
                 choose another --data-dir",
                self.data_dir.display()
            );
        }
        fs::create_dir_all(&self.data_dir)?;
        if let Some(user) = &self.run_as {
            std::os::unix::fs::chown(
                &self.data_dir,
                Some(user.uid.as_raw()),
                Some(user.gid.as_raw()),
            )
            .with_context(|| format!("cannot hand {} to {}", self.data_dir.display(), user.name))?;
        }
        tracing::info!(data_dir = %self.data_dir.display(), "initialising a local PostgreSQL cluster");
        let dir = self.data_dir_arg()?;
        let output = self
            .run(
                "initdb",
                &[
                    "-D",
                    dir,
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                ],
            )
            .await?;
        if !output.status.success() {
            let hint = match &self.run_as {
                Some(user) => format!(
                    "\n(as root, the cluster runs as `{}`, which must be able to reach {}; pick a \
                     --data-dir it can reach, such as one under /var/lib, or set DATABASE_URL)",
                    user.name,
                    self.data_dir.display()
                ),
                None => String::new(),
            };
            // Leave no half-initialised directory behind to trip the next start.
            let _ = fs::remove_dir_all(&self.data_dir);
            bail!("initdb failed: {}{hint}", describe(&output));
        }
        Ok(())
    }

    /// When pg_partman's background worker is installed next to these binaries: the
    /// settings that have it run the partition maintenance of the service's database
    /// every hour (src/partitions.rs registers the tables).
    fn partman_worker_options(&self) -> String {
        let worker = fs::canonicalize(self.bin_dir.join("postgres"))
            .ok()
            .and_then(|postgres| Some(postgres.parent()?.parent()?.join("lib")))
            .map(|lib| lib.join("pg_partman_bgw.so"));
        if !worker.is_some_and(|worker| worker.exists()) {
            return String::new();
        }
        format!(
            " -c shared_preload_libraries=pg_partman_bgw -c pg_partman_bgw.dbname={DATABASE} \
             -c pg_partman_bgw.role={SUPERUSER} -c pg_partman_bgw.interval=3600 \
             -c pg_partman_bgw.analyze=off"
        )
    }

    async fn is_running(&self) -> anyhow::Result<bool> {
        let output = self
            .run("pg_ctl", &["status", "-D", self.data_dir_arg()?])
            .await?;
        // pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
        Ok(output.status.success())
    }

    async fn start_if_stopped(&mut self) -> anyhow::Result<()> {
        if self.is_running().await? {
            tracing::info!(data_dir = %self.data_dir.display(), "reusing the running local PostgreSQL");
            return Ok(());
        }
        let dir = self.data_dir_arg()?;
        let log = self.data_dir.join("server.log");
        let log = log
            .to_str()
            .ok_or_else(|| anyhow!("log path is not UTF-8"))?;
        // No TCP listener: only a socket in the data directory, reachable by its owner.
        let mut options =
            format!("-c listen_addresses='' -k '{dir}' -c unix_socket_permissions=0700");
        options.push_str(&self.partman_worker_options());
        let output = self
            .run(
                "pg_ctl",
                &[
                    "start", "-D", dir, "-l", log, "-w", "-t", "60", "-o", &options,
                ],
            )
            .await?;
        if !output.status.success() {
            let tail = fs::read_to_string(log)
                .map(|text| {
                    text.lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}\nserver log ({log}):\n{tail}",
                describe(&output)
            );
        }
        tracing::info!(data_dir = %self.data_dir.display(), "started a local PostgreSQL");
        self.started_here = true;
        Ok(())
    }

    /// Connects to the cluster's `postgres` database, retrying while it finishes starting.
    pub async fn admin_connection(&self) -> anyhow::Result<PgConnection> {
        let options = self.connect_options("postgres").disable_statement_logging();
        let mut attempt = 0;
        loop {
            match PgConnection::connect_with(&options).await {
                Ok(conn) => return Ok(conn),
                Err(error) if attempt < 50 => {
                    attempt += 1;
                    tracing::debug!(%error, "local PostgreSQL not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    return Err(error).context("cannot connect to the local PostgreSQL");
                }
            }
        }
    }

    async fn create_database(&self) -> anyhow::Result<()> {
        let mut conn = self.admin_connection().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            // Identifiers cannot be bound; DATABASE is a constant.
            match sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
                .execute(&mut conn)
                .await
            {
                Ok(_) => {}
                // Another process created it in the meantime (42P04, or 23505 when both
                // inserted into pg_database at once).
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
                Err(e) => return Err(e).context("cannot create the service database"),
            }
        }
        conn.close().await?;
        Ok(())
    }

    /// Stops the cluster (fast shutdown: open transactions roll back, data is kept).
    pub async fn stop(&self) -> anyhow::Result<()> {
        let output = self
            .run(
                "pg_ctl",
                // Fast: sessions end at once; the shutdown checkpoint still writes every
                // dirty page, which on a busy disk can take longer than pg_ctl's default
                // minute.
                &[
                    "stop",
                    "-D",
                    self.data_dir_arg()?,
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "300",
                ],
            )
            .await?;
        if !output.status.success() {
            bail!("pg_ctl stop failed: {}", describe(&output));
        }
        tracing::info!(data_dir = %self.data_dir.display(), "stopped the local PostgreSQL");
        Ok(())
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}
