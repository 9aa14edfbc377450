//! A real Citus cluster on loopback for the tests: a coordinator and two workers, each a
//! PostgreSQL of its own (own data directory and socket, run as `postgres` when the tests
//! run as root, as the service's local cluster is), with Citus preloaded. One cluster per
//! test process, started on first use; a watchdog stops it when the process exits.
//!
//! Citus comes from Citus' own packages, or here from `../shared/citus/install.sh`. Where
//! it is not installed the tests say so and pass, unless `KRISP_REQUIRE_CITUS=1` (set by
//! `.ci/run`), which makes them fail instead.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use krisp_ingest::local_postgres;
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::sync::{OnceCell, RwLock, RwLockReadGuard, RwLockWriteGuard};
use uuid::Uuid;

/// The nodes: the coordinator first, then the workers, and last a spare node that only
/// the scale-out test adds to its database ([`Cluster::scale_out`]).
const NODES: usize = 4;
/// The nodes every database has: the coordinator and two workers.
const MEMBERS: usize = 3;

static CLUSTER: OnceCell<Option<Cluster>> = OnceCell::const_new();
/// The database the tests share (each with users, sessions and ids of its own).
static SHARED: OnceCell<PgConnectOptions> = OnceCell::const_new();
/// Tests that restart a worker take it for writing; every other test for reading, so that
/// no test sees a restart it did not make.
static RESTARTS: RwLock<()> = RwLock::const_new(());

pub struct Cluster {
    bin_dir: PathBuf,
    root: PathBuf,
    ports: [u16; NODES],
    run_as: Option<nix::unistd::User>,
}

/// The cluster (started on first use), or `None` where Citus is not installed and
/// `KRISP_REQUIRE_CITUS` is not set (the caller then skips).
pub async fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| async {
            // The directory the server binaries really are in (PATH may hold links to
            // them), where pg_config and psql are too.
            let postgres = local_postgres::find_bin_dir()
                .and_then(|dir| Ok(std::fs::canonicalize(dir.join("postgres"))?))
                .expect("PostgreSQL server binaries");
            let bin_dir = postgres.parent().expect("a bin directory").to_path_buf();
            if let Err(missing) = citus_installed(&bin_dir) {
                let required = std::env::var("KRISP_REQUIRE_CITUS").is_ok_and(|v| v == "1");
                assert!(!required, "KRISP_REQUIRE_CITUS=1, but {missing}");
                eprintln!(
                    "SKIPPED: the Citus tests, because {missing}. Install Citus 13 for this \
                     PostgreSQL (Citus' packages; in this workplace ../shared/citus/install.sh) \
                     to run them; KRISP_REQUIRE_CITUS=1 makes its absence a failure."
                );
                return None;
            }
            Some(Cluster::start(bin_dir).await)
        })
        .await
        .as_ref()
}

/// Skips the calling test (returns from it) where there is no Citus.
#[macro_export]
macro_rules! require_citus {
    () => {
        match $crate::citus::cluster::cluster().await {
            Some(cluster) => cluster,
            None => return,
        }
    };
}

fn citus_installed(bin_dir: &Path) -> Result<(), String> {
    let output = Command::new(bin_dir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .map_err(|e| format!("pg_config could not be run: {e}"))?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if libdir.join("citus.so").is_file() {
        Ok(())
    } else {
        Err(format!(
            "Citus is not installed ({} has no citus.so)",
            libdir.display()
        ))
    }
}

/// Three free ports below the kernel's range of ephemeral ports (32768 and up on Linux):
/// a worker restarted in a test must find its port still free, which a port of that range
/// is not sure to be once the worker is down (any outgoing connection may take it).
fn free_ports() -> [u16; NODES] {
    let mut ports = Vec::with_capacity(NODES);
    let start = 15_000 + (std::process::id() % 1_000) as u16 * 15;
    for port in start..32_000 {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            if ports.len() == NODES {
                break;
            }
        }
    }
    ports.try_into().expect("three free ports below 32000")
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

impl Cluster {
    async fn start(bin_dir: PathBuf) -> Self {
        let run_as = if nix::unistd::geteuid().is_root() {
            nix::unistd::User::from_name("postgres").expect("look up the postgres user")
        } else {
            None
        };
        let root = std::env::temp_dir().join(format!("krisp-citus-{}", std::process::id()));
        let cluster = Self {
            bin_dir,
            root,
            ports: free_ports(),
            run_as,
        };
        let _ = std::fs::remove_dir_all(&cluster.root);
        std::fs::create_dir_all(&cluster.root).expect("create the cluster's directory");
        if let Some(user) = &cluster.run_as {
            std::os::unix::fs::chown(
                &cluster.root,
                Some(user.uid.as_raw()),
                Some(user.gid.as_raw()),
            )
            .expect("hand the cluster's directory to postgres");
        }
        cluster.watch();
        for node in 0..NODES {
            cluster.init(node);
        }
        cluster
    }

    /// Stops the nodes and removes their directory once this process has exited.
    fn watch(&self) {
        let mut script = format!(
            "while [ -d /proc/{} ]; do sleep 1; done; ",
            std::process::id()
        );
        for node in 0..NODES {
            script.push_str(&format!(
                "{} stop -D {} -m immediate >/dev/null 2>&1; ",
                self.bin_dir.join("pg_ctl").display(),
                self.data_dir(node).display()
            ));
        }
        script.push_str(&format!("rm -rf {}", self.root.display()));
        // Run in the background by a shell that exits at once: the watchdog is nobody's
        // child to wait for, and outlives this process.
        let mut command = self.command("sh");
        command.args(["-c", &format!("( {script} ) >/dev/null 2>&1 &")]);
        // A process group of its own: what ends the test run's group leaves it running.
        command.process_group(0);
        let status = command.status().expect("start the cluster's watchdog");
        assert!(status.success(), "the cluster's watchdog did not start");
    }

    fn data_dir(&self, node: usize) -> PathBuf {
        self.root.join(format!("node{node}"))
    }

    /// A command run as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let path = if program == "sh" {
            PathBuf::from("/bin/sh")
        } else {
            self.bin_dir.join(program)
        };
        let mut command = Command::new(path);
        command.current_dir("/").env("LC_ALL", "C");
        if let Some(user) = &self.run_as {
            // And a home of its own: libpq in the nodes (Citus' connections between them)
            // would otherwise look for client certificates in the caller's.
            command
                .uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &self.root);
        }
        command
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}",
            describe(&output)
        );
    }

    fn init(&self, node: usize) {
        let dir = self.data_dir(node);
        let dir = dir.to_str().expect("a UTF-8 path");
        self.run(
            "initdb",
            &[
                "-D",
                dir,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
            ],
        );
        // fsync off: a node killed in a test loses nothing it wrote (the operating
        // system keeps it), and the suite runs faster. Connections: every test's server
        // keeps a pool, and the coordinator opens its own to the workers.
        // Every statement logged with its database: what a call costs the workers is
        // counted from their logs ([`Cluster::worker_statements`]). Logical WAL: Citus
        // moves shards online by logical replication ([`Cluster::scale_out`]).
        let settings = format!(
            "shared_preload_libraries = 'citus'\nmax_connections = 400\nfsync = off\n\
             full_page_writes = off\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = '{}'\nlog_statement = 'all'\n\
             log_line_prefix = '%m [%p] %d '\nwal_level = logical\n",
            self.ports[node],
            self.root.display()
        );
        let conf = self.data_dir(node).join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&settings);
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let log = self.root.join(format!("node{node}.log"));
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                dir,
                "-l",
                log.to_str().expect("UTF-8"),
                "-w",
                "-t",
                "60",
            ],
        );
    }

    /// Connect options of `database` on `node` (0: the coordinator).
    pub fn options(&self, node: usize, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.ports[node])
            .username("postgres")
            .database(database)
    }

    /// The port `node` listens on (0: the coordinator).
    pub fn port(&self, node: usize) -> u16 {
        self.ports[node]
    }

    /// The DATABASE_URL of `database` on the coordinator.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.ports[0])
    }

    async fn execute(&self, node: usize, database: &str, sql: &str) {
        if let Err(e) = self.try_execute(node, database, sql).await {
            panic!(
                "{sql} on node {node}: {e}\ncoordinator: {}",
                self.logged_errors(0)
            );
        }
    }

    async fn try_execute(&self, node: usize, database: &str, sql: &str) -> sqlx::Result<()> {
        let mut conn = PgConnection::connect_with(&self.options(node, database)).await?;
        sqlx::raw_sql(sql).execute(&mut conn).await?;
        conn.close().await.ok();
        Ok(())
    }

    /// A new database on every node, with the workers added, and the schema set up as
    /// docs/SCALING.md says: `krisp-ingest migrate --partman off`, `psql -f
    /// deploy/citus.sql`, then `krisp-ingest migrate` (pg_partman, where installed). Returns
    /// a pool on the coordinator.
    pub async fn database(&self) -> PgPool {
        self.database_with_shards(32).await
    }

    /// [`Self::database`] with `shards` shards per distributed table (Citus' default is 32).
    pub async fn database_with_shards(&self, shards: u32) -> PgPool {
        let name = format!("krisp_{}", Uuid::new_v4().simple());
        for node in 0..MEMBERS {
            self.execute(node, "postgres", &format!("CREATE DATABASE {name}"))
                .await;
            self.execute(node, &name, "CREATE EXTENSION citus").await;
        }
        let mut nodes = format!(
            "SELECT citus_set_coordinator_host('127.0.0.1', {});",
            self.ports[0]
        );
        for port in &self.ports[1..MEMBERS] {
            nodes.push_str(&format!("SELECT citus_add_node('127.0.0.1', {port});"));
        }
        // Registering the nodes opens the coordinator's connections to them. Right after a
        // test has restarted a worker, the first of those has been seen to fail ("failure
        // on connection marked as essential"); the registration is one transaction, and
        // is tried again.
        for attempt in 1.. {
            match self.try_execute(0, &name, &nodes).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    eprintln!("registering the nodes of {name} failed, again in 1 s: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => panic!(
                    "registering the nodes of {name}: {e}\ncoordinator: {}",
                    self.logged_errors(0)
                ),
            }
        }

        self.execute(
            0,
            &name,
            &format!("ALTER DATABASE {name} SET citus.shard_count = {shards}"),
        )
        .await;
        let url = self.url(&name);
        self.krisp_ingest(&url, &["migrate", "--partman", "off"]);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/citus.sql");
        self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &url,
                "-f",
                script,
            ],
        );
        self.krisp_ingest(&url, &["migrate"]);
        PgPoolOptions::new()
            .max_connections(8)
            .connect_with(self.options(0, &name))
            .await
            .expect("connect to the coordinator")
    }

    /// A pool on the database the tests share, set up once as [`Self::database`] does.
    pub async fn shared_database(&self) -> PgPool {
        let options = SHARED
            .get_or_init(|| async { self.database().await.connect_options().as_ref().clone() })
            .await;
        PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .expect("connect to the coordinator")
    }

    /// Runs the real binary with `args` against `url`; panics unless it succeeds.
    pub fn krisp_ingest(&self, url: &str, args: &[&str]) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_krisp-ingest"))
            .args(args)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run krisp-ingest");
        assert!(
            output.status.success(),
            "krisp-ingest {args:?} failed: {}",
            describe(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Restarts worker `worker` (1 or 2) in immediate mode: every backend is killed at
    /// once, as in a crash, and the node recovers from its WAL.
    pub fn restart_worker(&self, worker: usize) {
        assert!((1..NODES).contains(&worker), "worker {worker}");
        let dir = self.data_dir(worker);
        let log = self.root.join(format!("node{worker}.log"));
        // With its log file: a server started by pg_ctl without one would hold this
        // command's output open.
        self.run(
            "pg_ctl",
            &[
                "restart",
                "-D",
                dir.to_str().expect("UTF-8"),
                "-l",
                log.to_str().expect("UTF-8"),
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
            ],
        );
    }

    /// The statements that the workers ran on shards of `database` while `work` ran:
    /// the text of each logged statement that names a shard (`<table>_<shard id>`), so
    /// that Citus' own bookkeeping (BEGIN, transaction ids, PREPARE, COMMIT) is left out.
    pub async fn worker_statements(
        &self,
        database: &str,
        work: impl std::future::Future<Output = ()>,
    ) -> Vec<String> {
        let logs: Vec<PathBuf> = (1..NODES)
            .map(|node| self.root.join(format!("node{node}.log")))
            .collect();
        let before: Vec<u64> = logs
            .iter()
            .map(|log| std::fs::metadata(log).map(|m| m.len()).unwrap_or(0))
            .collect();
        work.await;
        // The workers write their logs as they go; let the last lines land.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut statements = Vec::new();
        for (log, from) in logs.iter().zip(before) {
            let text = std::fs::read(log).expect("read a worker's log");
            let text = String::from_utf8_lossy(&text[from as usize..]).into_owned();
            statements.extend(shard_statements(&text, database));
        }
        statements
    }

    /// Waits until every node reaches every other again (after a restart), at most a
    /// minute.
    pub async fn wait_until_healthy(&self, db: &PgPool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let unhealthy: Result<i64, _> = sqlx::query_scalar(
                "SELECT count(*) FROM citus_check_cluster_node_health() WHERE result IS NOT TRUE",
            )
            .fetch_one(db)
            .await;
            match unhealthy {
                Ok(0) => return,
                other => assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster is not healthy a minute after a restart: {other:?}"
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Adds the spare node to `database` and moves shards onto it while the cluster
    /// serves (`citus_rebalance_start`, logical replication, a short write block per
    /// shard group at its switch-over); returns once every move is done, with the
    /// number of shard placements the spare node holds then.
    pub async fn scale_out(&self, database: &str) -> i64 {
        let spare = NODES - 1;
        self.execute(spare, "postgres", &format!("CREATE DATABASE {database}"))
            .await;
        self.execute(spare, database, "CREATE EXTENSION citus")
            .await;
        let mut conn = PgConnection::connect_with(&self.options(0, database))
            .await
            .expect("connect to the coordinator");
        for statement in [
            format!("SELECT citus_add_node('127.0.0.1', {})", self.ports[spare]),
            "SELECT citus_rebalance_start()".to_owned(),
            "SELECT citus_rebalance_wait()".to_owned(),
        ] {
            sqlx::query(&statement)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        let failed: Vec<String> = sqlx::query_scalar(
            "SELECT state::text FROM citus_rebalance_status() WHERE state::text <> 'finished'",
        )
        .fetch_all(&mut conn)
        .await
        .expect("the rebalance's status");
        assert!(
            failed.is_empty(),
            "the rebalance did not finish: {failed:?}"
        );
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid) \
             WHERE n.nodeport = $1",
        )
        .bind(i32::from(self.ports[spare]))
        .fetch_one(&mut conn)
        .await
        .expect("the spare node's placements")
    }

    /// The errors `node` has logged, each with the lines that follow it (detail,
    /// statement): what a failing test shows of the cluster's side.
    pub fn logged_errors(&self, node: usize) -> String {
        let log =
            std::fs::read_to_string(self.root.join(format!("node{node}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let mut errors = String::new();
        for (i, line) in lines.iter().enumerate() {
            if line.contains("ERROR:") || line.contains("WARNING:") {
                for line in lines[i..].iter().take(3) {
                    errors.push_str(line);
                    errors.push('\n');
                }
            }
        }
        errors
    }

    /// Holds off restarts until dropped (every test but the restarts').
    pub async fn shared(&self) -> RwLockReadGuard<'static, ()> {
        RESTARTS.read().await
    }

    /// The cluster for a test that restarts workers, alone.
    pub async fn exclusive(&self) -> RwLockWriteGuard<'static, ()> {
        RESTARTS.write().await
    }
}

/// The statements in `log` (a worker's, from [`Cluster::init`]'s prefix) that ran in
/// `database` and name a shard.
fn shard_statements(log: &str, database: &str) -> Vec<String> {
    // An entry starts with its timestamp; a statement's text may go on over more lines.
    let mut entries: Vec<String> = Vec::new();
    for line in log.lines() {
        if line.starts_with(|c: char| c.is_ascii_digit()) || entries.is_empty() {
            entries.push(line.to_owned());
        } else if let Some(last) = entries.last_mut() {
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    let marker = format!(" {database} LOG:  ");
    entries
        .into_iter()
        .filter_map(|entry| {
            let (_, rest) = entry.split_once(&marker)?;
            let statement = rest.strip_prefix("statement: ").or_else(|| {
                rest.split_once(": ")
                    .map(|(_, text)| text)
                    .filter(|_| rest.starts_with("execute"))
            })?;
            names_a_shard(statement).then(|| statement.to_owned())
        })
        .collect()
}

/// Whether `sql` names a shard: an identifier that ends in `_` and six or more digits.
fn names_a_shard(sql: &str) -> bool {
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| {
            word.rsplit_once('_').is_some_and(|(table, id)| {
                !table.is_empty() && id.len() >= 6 && id.bytes().all(|b| b.is_ascii_digit())
            })
        })
}
