//! One `spawn_app()` for every test: a fresh database on the test PostgreSQL (DATABASE_URL
//! when set, otherwise the same local cluster the service uses by default), migrated, and
//! the real gRPC server on 127.0.0.1:0 with a tonic client connected to it.

use std::{net::SocketAddr, str::FromStr, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use krisp_ingest::{
    app::{Application, Settings},
    config::Limits,
    local_postgres::{self, LocalPostgres},
    proto::to_timestamp,
    proto::{self, ingest_service_client::IngestServiceClient},
    storage,
};
use sqlx::{
    Connection, Executor, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::sync::OnceCell;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

/// Connect options of the test server's maintenance database, found once per process.
static SERVER: OnceCell<PgConnectOptions> = OnceCell::const_new();

pub async fn server() -> PgConnectOptions {
    SERVER
        .get_or_init(|| async {
            let options = match std::env::var("DATABASE_URL") {
                Ok(url) => PgConnectOptions::from_str(&url)
                    .expect("DATABASE_URL is not a valid PostgreSQL URL")
                    .database("postgres"),
                Err(_) => {
                    let dir = std::env::var_os("KRISP_DATA_DIR")
                        .map(Into::into)
                        .unwrap_or_else(local_postgres::default_data_dir);
                    LocalPostgres::ensure(&dir)
                        .await
                        .expect("cannot start the local PostgreSQL for tests")
                        .connect_options("postgres")
                }
            };
            drop_stale_databases(&options).await;
            options
        })
        .await
        .clone()
}

const PREFIX: &str = "krisp_test_";

/// Drops the databases of earlier test processes that are no longer running.
async fn drop_stale_databases(options: &PgConnectOptions) {
    let mut conn = PgConnection::connect_with(options)
        .await
        .expect("connect to test server");
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'krisp\\_test\\_%'")
            .fetch_all(&mut conn)
            .await
            .expect("list test databases");
    for name in names {
        let pid = name[PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = conn
                .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                .await;
        }
    }
}

/// Creates a fresh, migrated database and returns a pool on it.
pub async fn fresh_database() -> PgPool {
    let pool = empty_database().await;
    storage::migrate(&pool)
        .await
        .expect("migrate test database");
    pool
}

/// A DATABASE_URL for `database` of the test server, logged in as `role` (no password:
/// the test server trusts local connections).
pub async fn database_url(database: &str, role: &str) -> String {
    let server = server().await;
    let port = server.get_port();
    match server.get_socket() {
        Some(socket) => format!(
            "postgres://{role}@localhost:{port}/{database}?host={}",
            socket.display()
        ),
        None => format!("postgres://{role}@{}:{port}/{database}", server.get_host()),
    }
}

/// Creates a fresh database without any schema and returns a pool on it.
pub async fn empty_database() -> PgPool {
    let server = server().await;
    let name = format!("{PREFIX}{}_{}", std::process::id(), Uuid::new_v4().simple());
    let mut conn = PgConnection::connect_with(&server)
        .await
        .expect("connect to test server");
    conn.execute(format!("CREATE DATABASE \"{name}\"").as_str())
        .await
        .expect("create test database");
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(server.database(&name))
        .await
        .expect("connect to test database")
}

/// The name of `db`'s database.
pub async fn current_database(db: &PgPool) -> String {
    sqlx::query_scalar("SELECT current_database()")
        .fetch_one(db)
        .await
        .expect("current_database()")
}

/// A new login role `<prefix>_<uuid>` with the service's run-time privileges on `owner`'s
/// database (`grant-runtime-role`), and a pool on that database logged in as it.
pub async fn runtime_role(owner: &PgPool, prefix: &str) -> (String, PgPool) {
    let role = format!("{prefix}_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(owner)
        .await
        .expect("create the role");
    storage::grant_runtime_role(owner, &role)
        .await
        .expect("grant the run-time privileges");
    let pool = connect_as(&current_database(owner).await, &role).await;
    (role, pool)
}

/// Drops `role` (roles outlive the test databases) with what it owns or was granted in
/// `owner`'s database.
pub async fn drop_role(owner: &PgPool, role: &str) {
    for statement in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(&statement)
            .execute(owner)
            .await
            .expect(&statement);
    }
}

/// A pool on database `database` of the test server, logged in as `role`.
pub async fn connect_as(database: &str, role: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(server().await.database(database).username(role))
        .await
        .expect("connect as the role")
}

pub struct TestApp {
    pub address: SocketAddr,
    pub client: IngestServiceClient<Channel>,
    pub channel: Channel,
    /// The test's own view of the database, to check what the server stored.
    pub db: PgPool,
}

/// Starts the server as `main` does, on 127.0.0.1:0, over a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_on(fresh_database().await).await
}

/// Starts the server over `db`, which the test may also use to look at what it stores.
pub async fn spawn_app_on(db: PgPool) -> TestApp {
    spawn_app_with(db, Limits::default()).await
}

/// Starts the server over `db` with `limits`.
pub async fn spawn_app_with(db: PgPool, limits: Limits) -> TestApp {
    spawn_app_configured(db, |settings| settings.limits = limits).await
}

/// Starts the server over `db` as `main` does (the same `Application::build`), on
/// 127.0.0.1:0, with the default settings changed by `configure`.
pub async fn spawn_app_configured(db: PgPool, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = Settings::default();
    configure(&mut settings);
    let application = Application::build(settings, db.clone())
        .await
        .expect("build application");
    let address = application.local_addr();
    tokio::spawn(application.run_until_stopped(std::future::pending()));
    TestApp::connect(address, db).await
}

/// Items in one batch enough to make a stream a bulk upload (about 780 KB of rows at
/// once), which the server writes as they arrive instead of spooling to the trailer.
pub const BULK_ITEMS: usize = 6000;

/// Starts the server over a fresh database with streams written as they arrive kept
/// writing for a minute of client silence: tests that act while a stream's transaction
/// is open use it, instead of racing the default second.
pub async fn spawn_writing_app() -> TestApp {
    spawn_app_with(fresh_database().await, writing_limits()).await
}

/// The default limits with a minute of writer idle.
pub fn writing_limits() -> Limits {
    Limits {
        stream_writer_idle: Duration::from_secs(60),
        ..Limits::default()
    }
}

/// Fails unless the server's health check answers SERVING.
pub async fn assert_serving(channel: &Channel) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

/// A new connection (its own HTTP/2 connection) to the server.
pub async fn connect(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the test server")
}

pub fn at(base: DateTime<Utc>, seconds: i64) -> Option<prost_types::Timestamp> {
    Some(to_timestamp(base + TimeDelta::seconds(seconds)))
}

/// A fixed instant, so that tests do not depend on the clock.
pub fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000, 0).unwrap()
}

/// The field violations of an INVALID_ARGUMENT status, as (field, description) pairs.
pub fn violations(status: &Status) -> Vec<(String, String)> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .map(|br| {
            br.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.description.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The fields named by an INVALID_ARGUMENT status.
pub fn violated_fields(status: &Status) -> Vec<String> {
    violations(status)
        .into_iter()
        .map(|(field, _)| field)
        .collect()
}

/// Makes the database refuse (raise an error for) every sentiment row with `score`: a
/// real write failure, for the rows a test chooses.
pub async fn refuse_sentiments_scored(db: &PgPool, score: f64) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_row() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.score = {score} THEN RAISE EXCEPTION 'refused by test'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_row BEFORE INSERT ON sentiments \
         FOR EACH ROW EXECUTE FUNCTION refuse_row();"
    ))
    .execute(db)
    .await
    .expect("install the refusing trigger");
}

/// Waits (bounded) until `condition` holds; panics with `what` when it never does.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Backends of the test database (other than ours) inside a transaction.
pub async fn open_transactions(db: &PgPool) -> i64 {
    count(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
    )
    .await
}

/// A data directory that does not exist yet, in a temporary directory removed on drop.
pub fn fresh_data_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    // When the tests run as root, the cluster runs as `postgres`, which must reach it.
    std::fs::set_permissions(
        root.path(),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    let data_dir = root.path().join("postgres");
    (root, data_dir)
}

pub async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.expect(sql)
}

impl TestApp {
    /// A client of the server at `address`, with `db` to look at what it stores.
    pub async fn connect(address: SocketAddr, db: PgPool) -> Self {
        let channel = connect(address).await;
        Self {
            address,
            client: IngestServiceClient::new(channel.clone()),
            channel,
            db,
        }
    }

    pub async fn create_user(&self, external_id: &str) -> proto::User {
        self.client
            .clone()
            .create_user(proto::CreateUserRequest {
                request_id: String::new(),
                external_id: external_id.into(),
                country: "US".into(),
                native_language: "en".into(),
                region: "California".into(),
            })
            .await
            .expect("CreateUser")
            .into_inner()
            .user
            .unwrap()
    }

    pub async fn upsert_timezone(&self, code: &str, offset_seconds: i64) -> proto::Timezone {
        self.client
            .clone()
            .upsert_timezone(proto::UpsertTimezoneRequest {
                timezone: Some(proto::Timezone {
                    code: code.into(),
                    utc_offset: Some(prost_types::Duration {
                        seconds: offset_seconds,
                        nanos: 0,
                    }),
                }),
            })
            .await
            .expect("UpsertTimezone")
            .into_inner()
            .timezone
            .unwrap()
    }

    pub async fn create_session(&self, started_at: DateTime<Utc>) -> proto::Session {
        self.client
            .clone()
            .create_session(proto::CreateSessionRequest {
                request_id: String::new(),
                session_type: proto::SessionType::Call as i32,
                started_at: Some(to_timestamp(started_at)),
            })
            .await
            .expect("CreateSession")
            .into_inner()
            .session
            .unwrap()
    }

    pub async fn join(
        &self,
        user: &proto::User,
        session: &proto::Session,
        connected_at: DateTime<Utc>,
    ) -> Result<proto::Participation, Status> {
        self.client
            .clone()
            .join_session(proto::JoinSessionRequest {
                request_id: String::new(),
                user_id: user.id.clone(),
                session_id: session.id.clone(),
                timezone_code: "UTC".into(),
                connected_at: Some(to_timestamp(connected_at)),
            })
            .await
            .map(|r| r.into_inner().participation.unwrap())
    }

    /// Streams `batches` of sentiments for `participation_id` in one new stream; panics
    /// unless it commits.
    pub async fn stream_sentiments(
        &self,
        participation_id: &str,
        batches: Vec<Vec<proto::NewSentiment>>,
    ) -> proto::StreamReceipt {
        let stream = frames::stream(&Uuid::new_v4().to_string(), participation_id, batches);
        self.client
            .clone()
            .stream_sentiments(tokio_stream::iter(stream))
            .await
            .expect("StreamSentiments")
            .into_inner()
            .receipt
            .expect("a receipt")
    }

    /// A user connected to a new session at t0 (in timezone UTC).
    pub async fn participation(&self) -> proto::Participation {
        self.upsert_timezone("UTC", 0).await;
        let user = self.create_user(&format!("user-{}", Uuid::new_v4())).await;
        let session = self.create_session(t0()).await;
        self.join(&user, &session, t0()).await.expect("JoinSession")
    }

    /// GetUser of an id no user has: its status (NOT_FOUND).
    pub async fn get_unknown_user(&self) -> Status {
        self.client
            .clone()
            .get_user(proto::GetUserRequest {
                user_id: Uuid::new_v4().to_string(),
            })
            .await
            .expect_err("GetUser of an unknown id")
    }
}

/// A LeaveSession of `participation_id` at t0 + `disconnect` s, having talked `talked` s
/// (microphone used, speaker not).
pub fn leave(participation_id: &str, disconnect: i64, talked: i64) -> proto::LeaveSessionRequest {
    proto::LeaveSessionRequest {
        participation_id: participation_id.into(),
        disconnected_at: at(t0(), disconnect),
        talked_time: Some(prost_types::Duration {
            seconds: talked,
            nanos: 0,
        }),
        microphone_used: true,
        speaker_used: false,
    }
}

/// `n` valid sentiments of 1 s each, starting `offset` seconds after t0.
pub fn sentiments(offset: i64, n: usize) -> Vec<proto::NewSentiment> {
    (0..n as i64)
        .map(|i| proto::NewSentiment {
            started_at: at(t0(), offset + i),
            ended_at: at(t0(), offset + i + 1),
            label: proto::SentimentLabel::Neutral as i32,
            score: Some(0.25),
        })
        .collect()
}

/// The messages of event streams, as [`frames`] has them for sentiment streams.
pub mod event_frames {
    use super::proto::{self, stream_events_request::Frame};

    /// A complete, well-formed stream of `batches`.
    pub fn stream(
        stream_id: &str,
        participation_id: &str,
        batches: Vec<Vec<proto::NewEvent>>,
    ) -> Vec<proto::StreamEventsRequest> {
        let total: usize = batches.iter().map(Vec::len).sum();
        let header = Frame::Header(proto::StreamHeader {
            stream_id: stream_id.into(),
            participation_id: participation_id.into(),
        });
        let batches = batches
            .into_iter()
            .map(|events| Frame::Batch(proto::EventBatch { events }));
        let trailer = Frame::Trailer(proto::StreamTrailer {
            item_count: total as u64,
        });
        std::iter::once(header)
            .chain(batches)
            .chain(std::iter::once(trailer))
            .map(|frame| proto::StreamEventsRequest { frame: Some(frame) })
            .collect()
    }
}

pub mod frames {
    use super::proto::{self, stream_sentiments_request::Frame};

    fn wrap(frame: Frame) -> proto::StreamSentimentsRequest {
        proto::StreamSentimentsRequest { frame: Some(frame) }
    }

    pub fn header(stream_id: &str, participation_id: &str) -> proto::StreamSentimentsRequest {
        wrap(Frame::Header(proto::StreamHeader {
            stream_id: stream_id.into(),
            participation_id: participation_id.into(),
        }))
    }

    pub fn batch(sentiments: Vec<proto::NewSentiment>) -> proto::StreamSentimentsRequest {
        wrap(Frame::Batch(proto::SentimentBatch { sentiments }))
    }

    pub fn trailer(item_count: u64) -> proto::StreamSentimentsRequest {
        wrap(Frame::Trailer(proto::StreamTrailer { item_count }))
    }

    /// A complete, well-formed stream of `batches`.
    pub fn stream(
        stream_id: &str,
        participation_id: &str,
        batches: Vec<Vec<proto::NewSentiment>>,
    ) -> Vec<proto::StreamSentimentsRequest> {
        let total: usize = batches.iter().map(Vec::len).sum();
        let mut out = vec![header(stream_id, participation_id)];
        out.extend(batches.into_iter().map(batch));
        out.push(trailer(total as u64));
        out
    }
}

/// GetUser through `client`; panics unless it answers with the user.
pub async fn fetch_user(client: &mut IngestServiceClient<Channel>, user_id: &str) -> proto::User {
    client
        .get_user(proto::GetUserRequest {
            user_id: user_id.to_owned(),
        })
        .await
        .expect("GetUser")
        .into_inner()
        .user
        .expect("a user")
}

/// GetParticipation through `client`; panics unless it answers with the participation.
pub async fn fetch_participation(
    client: &mut IngestServiceClient<Channel>,
    participation_id: &str,
) -> proto::Participation {
    client
        .get_participation(proto::GetParticipationRequest {
            participation_id: participation_id.to_owned(),
        })
        .await
        .expect("GetParticipation")
        .into_inner()
        .participation
        .expect("a participation")
}

/// Connect options for `database` of the test server through a relay listening on
/// 127.0.0.1:`port`.
pub async fn options_via(port: u16, database: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(server().await.get_username())
        .database(database)
}

/// A TCP path to the test PostgreSQL that the test can cut: connections through
/// [`Self::options`] reach the server until [`Self::cut`], which closes the listener and
/// every connection through it (new ones are then refused).
pub struct CuttableLink {
    port: u16,
    database: String,
    tasks: tokio::task::JoinSet<()>,
}

impl CuttableLink {
    /// A link to `database` of the test server.
    pub async fn to(database: &str) -> Self {
        let server = server().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let server = server.clone();
                connections.spawn(async move {
                    let upstream = match server.get_socket() {
                        Some(socket) => {
                            let path = socket.join(format!(".s.PGSQL.{}", server.get_port()));
                            let mut up = tokio::net::UnixStream::connect(path).await.unwrap();
                            tokio::io::copy_bidirectional(&mut client, &mut up).await
                        }
                        None => {
                            let address = (server.get_host().to_owned(), server.get_port());
                            let mut up = tokio::net::TcpStream::connect(address).await.unwrap();
                            tokio::io::copy_bidirectional(&mut client, &mut up).await
                        }
                    };
                    drop(upstream);
                });
            }
        });
        Self {
            port,
            database: database.to_owned(),
            tasks,
        }
    }

    /// Connect options through the link.
    pub async fn options(&self) -> PgConnectOptions {
        options_via(self.port, &self.database).await
    }

    /// Cuts the link: the listener and every connection through it go away.
    pub fn cut(&mut self) {
        self.tasks.abort_all();
    }
}

/// Locks participation `id`'s row (FOR UPDATE) in a transaction of `db`'s, until the
/// transaction ends: a sentiment or event of it waits in its foreign-key check.
pub async fn lock_participation(
    db: &PgPool,
    id: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut locker = db.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM participations WHERE id = $1::uuid FOR UPDATE")
        .bind(id)
        .execute(&mut *locker)
        .await
        .expect("lock the participation");
    locker
}

/// Waits until `n` inserts into sentiments wait on a lock (with or without a claim of
/// their `request_id`s first).
pub async fn sentiment_inserts_waiting(db: &PgPool, n: i64) {
    eventually("inserts of sentiments wait on a lock", || async {
        count(
            db,
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND (query LIKE 'INSERT INTO sentiments%' \
                OR query LIKE 'WITH claimed AS (%INSERT INTO sentiments%')",
        )
        .await
            == n
    })
    .await;
}
