//! Live feeds under faults provoked for real: feeds cut again and again (the client
//! cancels, drops its connection, or the server sends GOAWAY when the connection ages),
//! a server killed with SIGKILL and PostgreSQL restarted while feeds run. Each feed is a
//! resuming client that keeps what is not acknowledged and resumes where Opened says;
//! afterwards every feed holds exactly its items, once.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use krisp_ingest::{
    config::Limits,
    local_postgres::{self, LocalPostgres},
    proto::{self, ingest_service_client::IngestServiceClient, live_feed_response::Frame as Reply},
};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use crate::helpers::{TestApp, fresh_data_dir, spawn_app_with};
use crate::live::{append, close, feed_rows, open_message};

/// How a session of a feed is cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// The client cancels the call (RST_STREAM), its connection stays.
    Cancel,
    /// The client's connection goes away.
    DropConnection,
    /// The server's connection age runs out (GOAWAY, then the grace): wait for it.
    Goaway,
}

/// A small deterministic generator (xorshift64*).
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

async fn connect(address: SocketAddr) -> Option<Channel> {
    Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

/// One session: Open, some appends, then the cut. Returns the acknowledged position,
/// and whether the feed was closed. Any error ends the session like a cut.
struct Session {
    tx: mpsc::Sender<proto::LiveFeedRequest>,
    replies: tonic::Streaming<proto::LiveFeedResponse>,
}

impl Session {
    async fn open(channel: Channel, feed_id: &str, participation_id: &str) -> Option<(Self, u64)> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(open_message(feed_id, participation_id))
            .await
            .ok()?;
        let mut replies = IngestServiceClient::new(channel)
            .live_feed(ReceiverStream::new(rx))
            .await
            .ok()?
            .into_inner();
        match replies.message().await.ok()??.frame? {
            Reply::Opened(opened) => Some((Self { tx, replies }, opened.committed_seq)),
            _ => None,
        }
    }

    /// Sends an append of `n` items from `first` and waits for its ack.
    async fn append(&mut self, first: u64, n: u64) -> Option<u64> {
        self.tx.send(append(first, n)).await.ok()?;
        match self.replies.message().await.ok()??.frame? {
            Reply::Ack(ack) => Some(ack.committed_through),
            _ => None,
        }
    }
}

/// Feeds `target` items to `feed_id`, cut at least `min_cuts` times with `cuts`, each
/// session resuming where Opened says; ends with Close. Returns the sessions cut.
async fn resuming_feed(
    server: Arc<Mutex<SocketAddr>>,
    participation_id: String,
    feed_id: String,
    target: u64,
    min_cuts: usize,
    cuts: &[Cut],
    seed: u64,
) -> usize {
    let mut random = Random(seed | 1);
    let mut acked = 0;
    let mut cut = 0;
    loop {
        let address = *server.lock().unwrap();
        let Some(channel) = connect(address).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some((mut session, committed)) =
            Session::open(channel.clone(), &feed_id, &participation_id).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // Nothing acknowledged is ever missing; nothing beyond what was sent exists.
        assert!(
            committed >= acked,
            "{feed_id}: acked {acked}, committed {committed}"
        );
        assert!(
            committed <= target,
            "{feed_id}: committed {committed} > {target}"
        );
        acked = committed;
        if acked == target && cut >= min_cuts {
            session.tx.send(close(target)).await.ok();
            if let Ok(Some(proto::LiveFeedResponse {
                frame: Some(Reply::Closed(closed)),
            })) = session.replies.message().await
            {
                assert_eq!(closed.items_stored, target);
                return cut;
            }
            continue;
        }
        let how = cuts[usize::try_from(random.below(cuts.len() as u64)).unwrap()];
        let mut broken = false;
        for _ in 0..random.below(3) {
            let n = (1 + random.below(3)).min(target - acked);
            if n == 0 {
                break;
            }
            match session.append(acked + 1, n).await {
                Some(through) => {
                    assert_eq!(through, acked + n, "{feed_id}: ack out of order");
                    acked = through;
                }
                None => {
                    broken = true;
                    break;
                }
            }
        }
        if !broken {
            match how {
                Cut::Cancel | Cut::DropConnection => {
                    // Half the time, cut with an append in flight: its outcome is
                    // unknown until the next Open says.
                    if acked < target && random.below(2) == 0 {
                        let _ = session.tx.send(append(acked + 1, 1)).await;
                    }
                    if matches!(how, Cut::Cancel) {
                        // Keep the connection a moment after the call is dropped.
                        let keep = channel.clone();
                        drop(session);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        drop(keep);
                    }
                }
                Cut::Goaway => {
                    // Append slowly until the server cuts the connection.
                    loop {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        if acked == target {
                            if session.replies.message().await.is_err() {
                                break;
                            }
                            continue;
                        }
                        match session.append(acked + 1, 1).await {
                            Some(through) => acked = through,
                            None => break,
                        }
                    }
                }
            }
        }
        cut += 1;
    }
}

/// Appends to `feed_id` at `address`, an item per append, until `through` is acknowledged,
/// all in one session: sessions are tried again (for up to 10 s) until one has every
/// append it sends acknowledged. After a database restart a writer whose connection broke
/// fails one append and opens a new connection; one that kept the broken connection would
/// fail every append it took, and no session would get through.
async fn appends_in_one_session(
    address: SocketAddr,
    feed_id: &str,
    participation_id: &str,
    through: u64,
) -> Session {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    'sessions: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{feed_id}: no session had every append acknowledged within 10 s"
        );
        let Some(channel) = connect(address).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some((mut session, mut acked)) =
            Session::open(channel, feed_id, participation_id).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while acked < through {
            match session.append(acked + 1, 1).await {
                Some(committed) => acked = committed,
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'sessions;
                }
            }
        }
        return session;
    }
}

/// Every feed holds exactly its `target` items, once, and is closed.
async fn assert_exact(db: &PgPool, feeds: &[String], target: u64) {
    let target = i64::try_from(target).unwrap();
    for feed_id in feeds {
        assert_eq!(
            feed_rows(db, feed_id).await,
            (target, target, target),
            "{feed_id}"
        );
    }
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM live_feeds WHERE closed_at IS NULL OR committed_seq <> $1",
    )
    .bind(target)
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(open, 0);
}

/// Starts a resuming feed for each participation (feeds of `target` items, cut at least
/// `min_cuts` times with `cuts`); returns the feed ids and the tasks.
fn start_feeds(
    server: &Arc<Mutex<SocketAddr>>,
    participations: Vec<String>,
    target: u64,
    min_cuts: usize,
    cuts: &'static [Cut],
    seed: u64,
) -> (Vec<String>, Vec<tokio::task::JoinHandle<usize>>) {
    participations
        .into_iter()
        .enumerate()
        .map(|(i, participation_id)| {
            let feed_id = Uuid::new_v4().to_string();
            let task = tokio::spawn(resuming_feed(
                Arc::clone(server),
                participation_id,
                feed_id.clone(),
                target,
                min_cuts,
                cuts,
                seed + i as u64,
            ));
            (feed_id, task)
        })
        .unzip()
}

/// Waits (up to two minutes each) for the feeds to end; returns each one's cut sessions.
async fn finish_feeds(tasks: Vec<tokio::task::JoinHandle<usize>>) -> Vec<usize> {
    let mut cuts = Vec::new();
    for task in tasks {
        let task = tokio::time::timeout(Duration::from_secs(120), task).await;
        cuts.push(
            task.expect("a feed did not finish within 2 minutes")
                .unwrap(),
        );
    }
    cuts
}

async fn participations(app: &TestApp, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(app.participation().await.id);
    }
    out
}

#[tokio::test]
async fn two_hundred_feeds_cut_six_times_each_end_exact() {
    // The feeds' server: its connections age out after 1.5 s (+ 0.5 s grace), so GOAWAY
    // cuts for real. The participations are made through a second server on the same
    // database, whose connections stay.
    let db = crate::helpers::fresh_database().await;
    let setup = crate::helpers::spawn_app_on(db.clone()).await;
    let app = spawn_app_with(
        db,
        Limits {
            max_connection_age: Some(Duration::from_millis(1500)),
            max_connection_age_jitter_percent: 0,
            max_connection_age_grace: Duration::from_millis(500),
            ..Limits::default()
        },
    )
    .await;
    let server = Arc::new(Mutex::new(app.address));
    let target = 30;
    let (feeds, tasks) = start_feeds(
        &server,
        participations(&setup, 200).await,
        target,
        6,
        &[Cut::Cancel, Cut::DropConnection, Cut::Goaway],
        1,
    );
    let cuts = finish_feeds(tasks).await;
    assert!(cuts.iter().all(|cuts| *cuts >= 6), "{cuts:?}");
    println!("200 feeds, {} cut sessions", cuts.iter().sum::<usize>());
    assert_exact(&app.db, &feeds, target).await;
}

#[tokio::test]
async fn feeds_survive_a_killed_server_and_a_restarted_database_exactly() {
    let (_root, data_dir) = fresh_data_dir();
    // The real binary, on a cluster of its own in data_dir (it starts it).
    let (child, address, _lines, _) = crate::binary::start_logged(&data_dir, &[]);
    let cluster = LocalPostgres::ensure(&data_dir).await.unwrap();
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(cluster.connect_options(local_postgres::DATABASE))
        .await
        .unwrap();
    let app = TestApp::connect(address, db.clone()).await;
    let server = Arc::new(Mutex::new(address));
    let target = 60;
    let steady = (Uuid::new_v4().to_string(), app.participation().await.id);
    let (feeds, tasks) = start_feeds(
        &server,
        participations(&app, 20).await,
        target,
        2,
        &[Cut::Cancel, Cut::DropConnection],
        1000,
    );

    tokio::time::sleep(Duration::from_millis(800)).await;
    // SIGKILL: no shutdown, no cleanup; another server takes over the same database.
    let mut child = child;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let (child, address, lines, _) = crate::binary::start_logged(&data_dir, &[]);
    *server.lock().unwrap() = address;

    tokio::time::sleep(Duration::from_millis(800)).await;
    // One more feed, so that the feed writers of this server hold connections when the
    // database goes: after it is back, they must open new ones.
    appends_in_one_session(address, &steady.0, &steady.1, 6).await;
    // PostgreSQL stops under the feeds, and comes back.
    db.close().await;
    LocalPostgres::ensure(&data_dir)
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cluster = LocalPostgres::ensure(&data_dir).await.unwrap();
    let mut session = appends_in_one_session(address, &steady.0, &steady.1, 12).await;
    assert_eq!(session.append(13, target - 12).await, Some(target));
    session.tx.send(close(target)).await.unwrap();
    assert!(matches!(
        session
            .replies
            .message()
            .await
            .unwrap()
            .and_then(|r| r.frame),
        Some(Reply::Closed(_))
    ));

    finish_feeds(tasks).await;
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(cluster.connect_options(local_postgres::DATABASE))
        .await
        .unwrap();
    let mut feeds = feeds;
    feeds.push(steady.0);
    assert_exact(&db, &feeds, target).await;
    db.close().await;
    crate::binary::terminate(child, &lines).await;
    cluster.stop().await.unwrap();
}
