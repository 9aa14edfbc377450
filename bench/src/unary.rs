//! Unary calls: each RPC against its direct-SQL equivalent at the same
//! concurrency, and the floor of a unary call on this machine (the server's own health
//! Check). What each side does is said per [`Case`]; they are not the same work, and the
//! difference is the point of the comparison.

use std::{sync::Arc, time::Instant};

use anyhow::{Context, ensure};
use futures_util::{TryStreamExt, future::BoxFuture};
use krisp_ingest::{
    domain::Participation,
    proto::{self, ingest_service_client::IngestServiceClient, to_timestamp},
};
use sqlx::{PgPool, postgres::PgConnectOptions};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    Args,
    fixtures::{Fixtures, Measurement, checkpoint},
    probes::CpuProbe,
    scenarios::{check_stored, insert_plain, percentile, run_concurrently},
    server::Server,
};

/// Sentiments in the participation whose timeline is read.
const TIMELINE_ROWS: i64 = 100;
/// Users GetUser reads, round robin.
const READ_USERS: usize = 64;

/// One unary RPC and its direct-SQL equivalent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Case {
    /// RecordSentiment (with a request_id) against one plain INSERT per row.
    Record,
    /// RecordSentiment without a request_id (the server picks the id, so the statement
    /// claims none) against the same plain INSERT.
    RecordNewId,
    /// GetUser against `SELECT ... FROM users WHERE id = $1`.
    GetUser,
    /// JoinSession (with a request_id) against one plain INSERT INTO participations.
    JoinSession,
    /// GetTimeline until its first entry against the timeline query until its first row.
    Timeline,
}

impl Case {
    /// The report's names of the gRPC side and the SQL side.
    pub(crate) fn methods(self) -> (&'static str, &'static str) {
        match self {
            Case::Record => ("grpc-unary", "sqlx-insert"),
            Case::RecordNewId => ("grpc-unary-new-id", "sqlx-insert"),
            Case::GetUser => ("grpc-get-user", "sqlx-get-user"),
            Case::JoinSession => ("grpc-join-session", "sqlx-join-session"),
            Case::Timeline => ("grpc-timeline-first", "sqlx-timeline-first"),
        }
    }
}

/// The direct-SQL side the report sets beside the gRPC side `grpc`.
pub(crate) fn sql_method(grpc: &str) -> Option<&'static str> {
    use clap::ValueEnum as _;
    Case::value_variants()
        .iter()
        .map(|case| case.methods())
        .find(|(side, _)| *side == grpc)
        .map(|(_, sql)| sql)
}

/// What the calls of one measurement work on, made before the timing.
#[derive(Clone)]
enum Target {
    /// Record: an open participation with no items; Timeline: one with [`TIMELINE_ROWS`].
    Participation(Participation),
    /// GetUser: users to read; JoinSession: users without a participation, one per call.
    Users(Arc<Vec<Uuid>>),
}

/// A user as GetUser reads it: id, external_id, country, native_language, region,
/// created_at.
type UserRow = (
    Uuid,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
);

type Call = Arc<dyn Fn(u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

async fn prepare(fx: &Fixtures, case: Case, requests: usize) -> anyhow::Result<Target> {
    Ok(match case {
        Case::Record | Case::RecordNewId => Target::Participation(fx.participation().await?),
        Case::GetUser => Target::Users(Arc::new(fx.users(READ_USERS).await?)),
        Case::JoinSession => Target::Users(Arc::new(fx.users(requests).await?)),
        Case::Timeline => {
            let participation = fx.participation().await?;
            sqlx::query(
                "INSERT INTO sentiments \
                   (id, user_id, participation_id, started_at, ended_at, label, score) \
                 SELECT gen_random_uuid(), $1, $2, $3 + i * interval '100 ms', \
                        $3 + (i + 1) * interval '100 ms', 'neutral', 0.5 \
                 FROM generate_series(0, $4 - 1) AS i",
            )
            .bind(participation.user_id)
            .bind(participation.id)
            .bind(fx.base)
            .bind(TIMELINE_ROWS)
            .execute(&fx.pool)
            .await?;
            Target::Participation(participation)
        }
    })
}

/// Checks afterwards that exactly the calls' rows were stored.
async fn verify(fx: &Fixtures, case: Case, target: &Target, requests: usize) -> anyhow::Result<()> {
    match (case, target) {
        (Case::Record | Case::RecordNewId, Target::Participation(p)) => {
            check_stored(fx, p, requests as u64).await
        }
        (Case::JoinSession, Target::Users(users)) => {
            let joined: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM participations WHERE user_id = ANY($1) AND session_id = $2",
            )
            .bind(users.as_slice())
            .bind(fx.session_id)
            .fetch_one(&fx.pool)
            .await?;
            ensure!(joined == requests as i64, "{joined} of {requests} joined");
            Ok(())
        }
        _ => Ok(()),
    }
}

fn user(users: &[Uuid], i: u64) -> anyhow::Result<Uuid> {
    users
        .get(i as usize % users.len().max(1))
        .copied()
        .context("no users")
}

/// The gRPC side of `case`: one call per invocation, checked.
fn grpc_call(fx: &Arc<Fixtures>, case: Case, target: Target, channel: Channel) -> Call {
    let client = IngestServiceClient::new(channel);
    let fx = Arc::clone(fx);
    Arc::new(move |i| {
        let (mut client, fx, target) = (client.clone(), Arc::clone(&fx), target.clone());
        Box::pin(async move {
            match (case, target) {
                (Case::Record | Case::RecordNewId, Target::Participation(p)) => {
                    client
                        .record_sentiment(proto::RecordSentimentRequest {
                            // Retry-safe calls, as a careful client makes them; or not.
                            request_id: match case {
                                Case::Record => Uuid::new_v4().to_string(),
                                _ => String::new(),
                            },
                            participation_id: p.id.to_string(),
                            sentiment: Some(fx.proto_sentiment(i)),
                        })
                        .await?;
                }
                (Case::GetUser, Target::Users(users)) => {
                    let id = user(&users, i)?.to_string();
                    let reply = client
                        .get_user(proto::GetUserRequest {
                            user_id: id.clone(),
                        })
                        .await?
                        .into_inner();
                    ensure!(reply.user.is_some_and(|u| u.id == id), "wrong user");
                }
                (Case::JoinSession, Target::Users(users)) => {
                    client
                        .join_session(proto::JoinSessionRequest {
                            user_id: user(&users, i)?.to_string(),
                            session_id: fx.session_id.to_string(),
                            timezone_code: "UTC".into(),
                            connected_at: Some(to_timestamp(fx.base)),
                            request_id: Uuid::new_v4().to_string(),
                        })
                        .await?;
                }
                (Case::Timeline, Target::Participation(p)) => {
                    let mut entries = client
                        .get_timeline(proto::GetTimelineRequest {
                            participation_id: p.id.to_string(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    let first = entries.message().await?.context("empty timeline")?;
                    ensure!(first.entry.is_some(), "an empty entry");
                }
                _ => anyhow::bail!("{case:?}: wrong target"),
            }
            Ok(())
        })
    })
}

/// The timeline query of the service (`storage::timeline`), the same text, also not
/// prepared.
const TIMELINE_QUERY: &str = "SELECT false AS is_event, id, started_at AS at, ended_at, \
        label AS kind, score, NULL::jsonb AS attributes \
     FROM sentiments \
     WHERE user_id = $1 AND participation_id = $2 AND started_at >= $3 \
     UNION ALL \
     SELECT true, id, occurred_at, NULL, kind, NULL, attributes \
     FROM events \
     WHERE user_id = $1 AND participation_id = $2 AND occurred_at >= $3 \
     ORDER BY at, is_event DESC, id";

/// The direct-SQL side of `case`, on `pool`. Not the same work as the RPC:
/// - Record: one plain INSERT of a row whose user and participation the client already
///   knows, with an id made by the client, a commit per row. RecordSentiment also
///   validates the request, derives the id from `request_id` (retry-safe), and stores
///   through the batcher: one statement per batch of concurrent calls, which claims each
///   `request_id` for its user (a data-modifying CTE into `sentiment_request_ids`: a
///   replayed request stores nothing), then `INSERT ... SELECT FROM UNNEST(...)` of the
///   claimed rows, having looked up the participation's user and checked the item lies in
///   its span, and commits once for the batch. RecordNewId: without a `request_id`, so the
///   server picks the id and the statement claims nothing (`INSERT ... SELECT FROM
///   UNNEST(...) JOIN participations`).
/// - GetUser: the same SELECT by primary key the RPC runs; the RPC adds only gRPC and the
///   conversion.
/// - JoinSession: one INSERT of the participation (the foreign keys check user, session,
///   timezone; the EXCLUDE constraint the overlap). The RPC's one statement also reads the
///   session, to refuse a join before it started or after it ended, and takes the id from
///   `request_id` (`ON CONFLICT DO NOTHING RETURNING`).
/// - Timeline: the timeline query by user and participation, until its first row. The RPC
///   first looks up the participation by id (the client does not send the user), then
///   runs the same query and streams the rows.
fn sql_call(fx: &Arc<Fixtures>, case: Case, target: Target, pool: PgPool) -> Call {
    let fx = Arc::clone(fx);
    Arc::new(move |i| {
        let (pool, fx, target) = (pool.clone(), Arc::clone(&fx), target.clone());
        Box::pin(async move {
            match (case, target) {
                (Case::Record | Case::RecordNewId, Target::Participation(p)) => {
                    insert_plain(&pool, &p, &fx.sentiment(i)).await?;
                }
                (Case::GetUser, Target::Users(users)) => {
                    let found: Option<UserRow> = sqlx::query_as(
                        "SELECT id, external_id, country, native_language, region, created_at \
                         FROM users WHERE id = $1",
                    )
                    .bind(user(&users, i)?)
                    .fetch_optional(&pool)
                    .await?;
                    ensure!(found.is_some(), "no such user");
                }
                (Case::JoinSession, Target::Users(users)) => {
                    sqlx::query(
                        "INSERT INTO participations \
                           (id, user_id, session_id, timezone_code, connected_at) \
                         VALUES ($1, $2, $3, 'UTC', $4)",
                    )
                    .bind(Uuid::now_v7())
                    .bind(user(&users, i)?)
                    .bind(fx.session_id)
                    .bind(fx.base)
                    .execute(&pool)
                    .await?;
                }
                (Case::Timeline, Target::Participation(p)) => {
                    let mut rows = sqlx::query(TIMELINE_QUERY)
                        .bind(p.user_id)
                        .bind(p.id)
                        .bind(p.connected_at)
                        .persistent(false)
                        .fetch(&pool);
                    ensure!(rows.try_next().await?.is_some(), "empty timeline");
                }
                _ => anyhow::bail!("{case:?}: wrong target"),
            }
            Ok(())
        })
    })
}

/// `requests` calls of `call` from `concurrency` tasks, timed, with the CPU of the client,
/// PostgreSQL and (when `server` is given) the server.
async fn measure(
    method: &str,
    call: Call,
    requests: usize,
    concurrency: usize,
    server: Option<u32>,
) -> anyhow::Result<Measurement> {
    let probe = CpuProbe::start(server);
    let (elapsed, latencies) =
        run_concurrently(requests, concurrency, move |i| Arc::clone(&call)(i)).await?;
    Ok(Measurement {
        method: method.into(),
        concurrency,
        rows: requests as u64,
        elapsed,
        latency: Some((percentile(&latencies, 0.5), percentile(&latencies, 0.99))),
        cpu: probe.stop(),
    })
}

async fn sql_side(
    fx: &Arc<Fixtures>,
    options: &PgConnectOptions,
    case: Case,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Measurement> {
    let size = u32::try_from(concurrency)?;
    // As many connections as calls in flight, with the planner's default setting as on
    // the service's pool (`app::pool_options` would leave out the connections the
    // service keeps apart).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .test_before_acquire(false)
        .connect_with(options.clone())
        .await?;
    // Warm-up (statements prepared on every connection), not timed.
    let warm = prepare(fx, case, concurrency * 4).await?;
    let call = sql_call(fx, case, warm, pool.clone());
    run_concurrently(concurrency * 4, concurrency, move |i| Arc::clone(&call)(i)).await?;
    let target = prepare(fx, case, requests).await?;
    let call = sql_call(fx, case, target.clone(), pool.clone());
    let measured = measure(case.methods().1, call, requests, concurrency, None).await?;
    pool.close().await;
    verify(fx, case, &target, requests).await?;
    Ok(measured)
}

async fn grpc_side(
    fx: &Arc<Fixtures>,
    server: &Server,
    case: Case,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Measurement> {
    let target = prepare(fx, case, requests).await?;
    let call = grpc_call(fx, case, target.clone(), server.channel().await?);
    let measured = measure(
        case.methods().0,
        call,
        requests,
        concurrency,
        Some(server.pid),
    )
    .await?;
    verify(fx, case, &target, requests).await?;
    Ok(measured)
}

/// The floor of a unary call on this machine: the server's own health Check (no database:
/// health answers from the status the monitor keeps), through the same layers (request
/// id, metrics, auth, admission) as every RPC. What a unary RPC costs above it is our
/// path's, not gRPC's.
async fn floor(
    server: &Server,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Measurement> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let client = HealthClient::new(server.channel().await?);
    let call: Call = Arc::new(move |_| {
        let mut client = client.clone();
        Box::pin(async move {
            let request = HealthCheckRequest {
                service: "krisp.ingest.v1.IngestService".into(),
            };
            client.check(request).await?;
            Ok(())
        })
    });
    measure("grpc-health", call, requests, concurrency, Some(server.pid)).await
}

/// Every case of `args.unary_cases` at every concurrency, `args.repeat` rounds. Each
/// round measures the direct-SQL side, then the gRPC side and the floor on a fresh server
/// whose pool has as many connections as the baseline's, warmed up (connections opened,
/// statements prepared) before timing: the sides alternate, so that drift on the machine
/// hits both, and their pools (up to 64 connections each) never hold connections at the
/// same time.
pub(crate) async fn run(
    args: &Args,
    fx: &Arc<Fixtures>,
    options: &PgConnectOptions,
) -> anyhow::Result<Vec<Measurement>> {
    let mut runs = Vec::new();
    let requests = args.unary_requests;
    for &c in &args.unary_concurrency {
        for round in 1..=args.repeat {
            let mut baselines = Vec::new();
            for &case in &args.unary_cases {
                let sql = case.methods().1;
                if baselines.contains(&sql) {
                    continue; // the same baseline as a case before it
                }
                baselines.push(sql);
                eprintln!("round {round}: {sql} x{c} ...");
                runs.push(sql_side(fx, options, case, requests, c).await?);
                checkpoint(&fx.pool).await?;
            }
            // Its pool gets c connections, as many as the direct-SQL side's, beside the
            // ones the service keeps for itself.
            let own = krisp_ingest::storage::OWN_CONNECTIONS as usize;
            let server = Server::start(args, c + own).await?;
            let started = Instant::now();
            for &case in &args.unary_cases {
                grpc_side(fx, &server, case, c * 20, c).await?;
            }
            floor(&server, c * 20, c).await?;
            checkpoint(&fx.pool).await?;
            eprintln!("warm-up x{c}: {:.1} s", started.elapsed().as_secs_f64());
            for &case in &args.unary_cases {
                eprintln!("round {round}: {} x{c} ...", case.methods().0);
                runs.push(grpc_side(fx, &server, case, requests, c).await?);
                checkpoint(&fx.pool).await?;
            }
            eprintln!("round {round}: grpc-health x{c} (the floor) ...");
            runs.push(floor(&server, requests, c).await?);
            server.stop().await?;
        }
    }
    Ok(runs)
}
