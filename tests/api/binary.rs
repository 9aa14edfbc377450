//! The README's first command: the real binary, with no configuration but a fresh data
//! directory, starts its own PostgreSQL, serves, shuts down on SIGTERM, and keeps the
//! data for the next start.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use krisp_ingest::proto::{self, ingest_service_client::IngestServiceClient};
use nix::{sys::signal, unistd::Pid};
use tonic::Code;

use crate::helpers::{connect, fresh_data_dir};
use tonic::transport::Channel;

/// Starts `krisp-ingest` with no DATABASE_URL and the given data directory; returns the
/// child and the address it printed.
fn start(data_dir: &Path) -> (Child, SocketAddr, mpsc::Receiver<String>) {
    start_with(data_dir, &[])
}

fn start_with(
    data_dir: &Path,
    env: &[(&str, &str)],
) -> (Child, SocketAddr, mpsc::Receiver<String>) {
    let (child, address, lines, _) = start_logged(data_dir, env);
    (child, address, lines)
}

/// The real binary serving `db` (as the role the tests connect as), on a data directory
/// of its own, with `env` besides: a process of its own, so its own metrics and traces.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) address: SocketAddr,
    pub(crate) lines: mpsc::Receiver<String>,
    pub(crate) logged: Vec<String>,
    _data_dir: tempfile::TempDir,
}

pub(crate) async fn serve_database(db: &sqlx::PgPool, env: &[(&str, &str)]) -> Served {
    let (root, data_dir) = fresh_data_dir();
    let url = crate::item_times::url_of(db).await;
    let mut all = vec![("DATABASE_URL", url.as_str())];
    all.extend_from_slice(env);
    let (child, address, lines, logged) = start_logged(&data_dir, &all);
    Served {
        child,
        address,
        lines,
        logged,
        _data_dir: root,
    }
}

/// Like [`start_with`], and also returns what the server logged before it listened.
pub(crate) fn start_logged(
    data_dir: &Path,
    env: &[(&str, &str)],
) -> (Child, SocketAddr, mpsc::Receiver<String>, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_krisp-ingest"))
        .env_remove("DATABASE_URL")
        .envs(env.iter().copied())
        .env("KRISP_SHUTDOWN_GRACE_SECONDS", "5")
        .env_remove("RUST_LOG")
        .env("KRISP_DATA_DIR", data_dir)
        .env("KRISP_LISTEN", "127.0.0.1:0")
        .env("KRISP_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start krisp-ingest");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let address = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no 'listening on' line; the server said: {seen:#?}"));
        if let Some(rest) = line.split("listening on ").nth(1) {
            // Plain text ends the line with the address; JSON closes a string after it.
            let address = rest.split(['"', ' ']).next().unwrap_or_default();
            break address.parse().expect("an address after 'listening on'");
        }
        seen.push(line);
    };
    (child, address, lines, seen)
}

/// The metrics address a server logged before it listened.
pub(crate) fn metrics_address(logged: &[String]) -> SocketAddr {
    logged
        .iter()
        .find(|line| line.contains("serving Prometheus metrics"))
        .and_then(|line| line.split("address=").nth(1))
        .and_then(|rest| rest.split([' ', '"']).next())
        .and_then(|address| address.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address: {logged:#?}"))
}

/// Sends SIGTERM and waits (without blocking the runtime, so that the test's own client
/// connections can close) for the exit.
/// The first line the server logs, from now on, that contains `needle` (within 30 s).
pub(crate) fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!("nothing logged with {needle:?}; the server said: {seen:#?}")
            });
        if line.contains(needle) {
            return line;
        }
        seen.push(line);
    }
}

pub(crate) async fn terminate(
    mut child: Child,
    lines: &mpsc::Receiver<String>,
) -> std::process::ExitStatus {
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    signal::kill(pid, signal::Signal::SIGTERM).unwrap();
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let said: Vec<String> = lines.try_iter().collect();
    panic!("krisp-ingest did not exit within 15 s of SIGTERM; it said: {said:#?}");
}

#[tokio::test]
async fn with_no_configuration_the_service_runs_on_its_own_postgres_and_keeps_data() {
    let (_root, data_dir) = fresh_data_dir();

    let (child, address, lines) = start(&data_dir);
    let mut client = IngestServiceClient::new(connect(address).await);
    let user = client
        .create_user(proto::CreateUserRequest {
            external_id: "kept-across-restarts".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    drop(client);
    assert!(terminate(child, &lines).await.success());
    // It started the cluster, so it stopped it.
    assert!(!data_dir.join("postmaster.pid").exists());

    let (child, address, lines) = start(&data_dir);
    let mut client = IngestServiceClient::new(connect(address).await);
    let fetched = crate::helpers::fetch_user(&mut client, &user.id.clone()).await;
    assert_eq!(fetched, user);
    let status = client
        .create_user(proto::CreateUserRequest {
            external_id: "kept-across-restarts".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    drop(client);
    assert!(terminate(child, &lines).await.success());
}

/// A database whose owner may create schemas but not extensions (a managed PostgreSQL's
/// usual role): pg_partman cannot be put there. The real binary says so and what it
/// means, and ingests into the default partitions.
#[tokio::test]
async fn without_pg_partman_the_binary_says_what_that_means_and_ingests() {
    let admin = crate::helpers::empty_database().await;
    let database = crate::helpers::current_database(&admin).await;
    let role = format!("krisp_owner_{}", uuid::Uuid::new_v4().simple());
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("ALTER DATABASE \"{database}\" OWNER TO {role}"),
    ] {
        sqlx::query(&statement).execute(&admin).await.unwrap();
    }
    let url = crate::helpers::database_url(&database, &role).await;
    let (_root, data_dir) = fresh_data_dir();
    let (child, address, lines, logged) = start_logged(&data_dir, &[("DATABASE_URL", &url)]);
    let warning = logged
        .iter()
        .find(|line| line.contains("stored in their default partitions"))
        .unwrap_or_else(|| panic!("no line about the partitions: {logged:#?}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("could not be created there") && warning.contains("no retention"),
        "{warning}"
    );

    let app = crate::helpers::TestApp::connect(address, admin.clone()).await;
    let participation = app.participation().await;
    app.client
        .clone()
        .record_sentiment(proto::RecordSentimentRequest {
            participation_id: participation.id.clone(),
            sentiment: crate::helpers::sentiments(0, 1).pop(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    drop(app);
    assert!(terminate(child, &lines).await.success());
    assert_eq!(
        crate::helpers::count(&admin, "SELECT count(*) FROM sentiments_default").await,
        1
    );
    assert_eq!(
        crate::helpers::count(
            &admin,
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_partman'"
        )
        .await,
        0
    );
    // Hand the database and its tables back, then drop the role.
    sqlx::query(&format!("REASSIGN OWNED BY {role} TO CURRENT_USER"))
        .execute(&admin)
        .await
        .unwrap();
    crate::helpers::drop_role(&admin, &role).await;
}

#[test]
fn a_bad_database_url_fails_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_krisp-ingest"))
        .env(
            "DATABASE_URL",
            "postgres://krisp:secret-pw@127.0.0.1:1/nothing",
        )
        .env("KRISP_LISTEN", "127.0.0.1:0")
        .env("KRISP_METRICS_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run krisp-ingest");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to DATABASE_URL"),
        "{stderr}"
    );
    assert!(stderr.contains("krisp:***@127.0.0.1:1"), "{stderr}");
    assert!(
        !stderr.contains("secret-pw"),
        "the password leaked: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_streams_that_finish_in_the_grace_and_cancels_the_rest() {
    use krisp_ingest::local_postgres::{self, LocalPostgres};
    use tokio_stream::wrappers::ReceiverStream;

    use crate::helpers::{frames, sentiments};

    let (_root, data_dir) = fresh_data_dir();
    let (child, address, lines) = start(&data_dir);
    let mut client = IngestServiceClient::new(connect(address).await);

    // A participation, then a stream that sends rows but never its trailer.
    client
        .upsert_timezone(proto::UpsertTimezoneRequest {
            timezone: Some(proto::Timezone {
                code: "UTC".into(),
                utc_offset: Some(prost_types::Duration::default()),
            }),
        })
        .await
        .unwrap();
    let user = client
        .create_user(proto::CreateUserRequest {
            external_id: "drain".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let session = client
        .create_session(proto::CreateSessionRequest {
            request_id: String::new(),
            session_type: proto::SessionType::Call as i32,
            started_at: crate::helpers::at(crate::helpers::t0(), 0),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let participation = client
        .join_session(proto::JoinSessionRequest {
            request_id: String::new(),
            user_id: user.id,
            session_id: session.id,
            timezone_code: "UTC".into(),
            connected_at: crate::helpers::at(crate::helpers::t0(), 0),
        })
        .await
        .unwrap()
        .into_inner()
        .participation
        .unwrap();
    // Stream A never finishes; stream B sends its trailer during the grace period.
    let open_stream = |client: &IngestServiceClient<tonic::transport::Channel>, id: String| {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut client = client.clone();
        let call =
            tokio::spawn(async move { client.stream_sentiments(ReceiverStream::new(rx)).await });
        (tx, call, id)
    };
    let client_b = IngestServiceClient::new(connect(address).await);
    let (tx_a, call_a, id_a) = open_stream(&client, uuid::Uuid::new_v4().to_string());
    let (tx_b, call_b, id_b) = open_stream(&client_b, uuid::Uuid::new_v4().to_string());
    for (tx, id, offset) in [(&tx_a, &id_a, 0), (&tx_b, &id_b, 5000)] {
        tx.send(frames::header(id, &participation.id))
            .await
            .unwrap();
        tx.send(frames::batch(sentiments(offset, 2500)))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = std::time::Instant::now();
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    signal::kill(pid, signal::Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // New calls are refused once draining began.
    let refused = match Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
    {
        Err(_) => Code::Unavailable,
        Ok(channel) => IngestServiceClient::new(channel)
            .list_timezones(proto::ListTimezonesRequest {})
            .await
            .map_or_else(|s| s.code(), |_| Code::Ok),
    };
    assert_eq!(refused, Code::Unavailable);
    // B finishes inside the grace period and commits.
    tx_b.send(frames::trailer(2500)).await.unwrap();
    drop(tx_b);
    let receipt = call_b.await.unwrap().unwrap().into_inner().receipt.unwrap();
    assert_eq!(receipt.items_stored, 2500);

    assert!(terminate(child, &lines).await.success());
    // The grace period is 5 s; the process exits within grace + 1 s.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "exit took {:?}",
        started.elapsed()
    );
    // A was rolled back with a status that says: retry.
    let outcome = call_a.await.unwrap();
    assert_eq!(outcome.map(|_| ()).unwrap_err().code(), Code::Unavailable);
    drop(tx_a);

    // Nothing of the stream was stored.
    let cluster = LocalPostgres::ensure(&data_dir).await.unwrap();
    let pool = sqlx::PgPool::connect_with(cluster.connect_options(local_postgres::DATABASE))
        .await
        .unwrap();
    let stored = |id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sentiments WHERE stream_id = $1")
                .bind(uuid::Uuid::parse_str(&id).unwrap())
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(stored(id_a).await, 0, "the unfinished stream left rows");
    assert_eq!(
        stored(id_b).await,
        2500,
        "the stream finished in the grace period is whole"
    );
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(users, 1);
    pool.close().await;
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn json_logs_carry_the_request_id_of_each_call() {
    let (_root, data_dir) = fresh_data_dir();
    let (child, address, lines) = start_with(&data_dir, &[("KRISP_LOG_FORMAT", "json")]);
    let mut client = IngestServiceClient::new(connect(address).await);
    let mut request = tonic::Request::new(proto::CreateUserRequest {
        external_id: String::new(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "log-me-7".parse().unwrap());
    let status = client.create_user(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    drop(client);
    assert!(terminate(child, &lines).await.success());
    let logged: Vec<serde_json::Value> = lines
        .try_iter()
        .map(|line| serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let rejection = logged
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("request rejected"))
        })
        .unwrap_or_else(|| panic!("no rejection logged: {logged:#?}"));
    assert!(rejection.to_string().contains("log-me-7"), "{rejection}");
}

#[test]
fn without_keys_it_refuses_a_public_address_and_keys_are_shown_once() {
    let (_root, data_dir) = fresh_data_dir();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_krisp-ingest"))
            .args(args)
            .env_remove("DATABASE_URL")
            .env("KRISP_DATA_DIR", &data_dir)
            .env("KRISP_METRICS_LISTEN", "off")
            .output()
            .expect("run krisp-ingest")
    };
    let refused = run(&["--listen", "0.0.0.0:0"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to serve") && stderr.contains("--insecure"),
        "{stderr}"
    );
    // The cluster it started for nothing is stopped again.
    assert!(!data_dir.join("postmaster.pid").exists());

    let created = run(&["keys", "create", "--name", "ci", "--scope", "read"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let key = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(key.starts_with("krisp_") && key.len() > 60, "{key}");
    let listed = run(&["keys", "list"]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(listing.contains("ci\tread\tlive"), "{listing}");
    assert!(!listing.contains(&key), "the key must be shown only once");
    let revoked = run(&["keys", "revoke", "--name", "ci"]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(String::from_utf8_lossy(&run(&["keys", "list"]).stdout).contains("ci\tread\trevoked"));
}
