//! Streams spool their items and hold no database connection while they wait for their
//! clients: many streams on a small pool, spill files and their removal (after commit,
//! cancel and a killed server), the spool's budgets, a bulk upload that falls silent.

use std::{path::Path, time::Duration};

use krisp_ingest::{app::Settings, config::Limits, proto};
use nix::{sys::signal, unistd::Pid};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::helpers::{
    BULK_ITEMS, TestApp, count, eventually, frames, fresh_database, open_transactions, sentiments,
    spawn_app_configured,
};

type Call = tokio::task::JoinHandle<Result<proto::StreamReceipt, Status>>;

/// A server spooling into a temporary directory of the test's, with `configure` applied.
async fn spooled_app(configure: impl FnOnce(&mut Settings)) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let app = spawn_app_configured(fresh_database().await, |settings| {
        settings.spool.dir = path;
        configure(settings);
    })
    .await;
    (app, dir)
}

/// The spill files under `dir`, in every server's spool directory.
fn spill_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|entry| entry.unwrap().path())
        .map(|path| {
            if path.is_dir() {
                spill_files(&path)
            } else {
                usize::from(path.extension().is_some_and(|e| e == "rows"))
            }
        })
        .sum()
}

/// Starts a stream on `app` and sends its header; the test sends the rest.
async fn open(app: &TestApp, stream_id: &str, participation_id: &str) -> (Sender, Call) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(frames::header(stream_id, participation_id))
        .await
        .unwrap();
    let mut client = app.client.clone();
    let call = tokio::spawn(async move {
        client
            .stream_sentiments(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().receipt.unwrap())
    });
    (tx, call)
}

type Sender = mpsc::Sender<proto::StreamSentimentsRequest>;

/// Rows stored for `stream_id`, and how many distinct item times among them.
async fn stored(app: &TestApp, stream_id: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT started_at) FROM sentiments WHERE stream_id = $1",
    )
    .bind(Uuid::parse_str(stream_id).unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_hundred_open_streams_on_a_pool_of_four_all_commit() {
    let db = fresh_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with((*db.connect_options()).clone())
        .await
        .unwrap();
    let app = crate::helpers::spawn_app_on(pool).await;
    let participation = app.participation().await;
    let mut open_streams = Vec::new();
    for i in 0..200 {
        let stream_id = Uuid::new_v4().to_string();
        let (tx, call) = open(&app, &stream_id, &participation.id).await;
        tx.send(frames::batch(sentiments(10 * i, 3))).await.unwrap();
        open_streams.push((stream_id, tx, call));
    }
    // All two hundred are open at once, and none holds a connection.
    assert_eq!(open_transactions(&app.db).await, 0);
    for (i, (_, tx, _)) in open_streams.iter().enumerate() {
        tx.send(frames::batch(sentiments(10 * i as i64 + 3, 2)))
            .await
            .unwrap();
        tx.send(frames::trailer(5)).await.unwrap();
    }
    for (stream_id, tx, call) in open_streams {
        drop(tx);
        let receipt = call.await.unwrap().unwrap();
        assert_eq!(receipt.items_stored, 5);
        assert_eq!(stored(&app, &stream_id).await, (5, 5));
    }
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM sentiments").await,
        1000
    );
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM ingest_streams").await,
        200
    );
}

#[tokio::test]
async fn a_spilled_stream_commits_exactly_and_its_file_is_removed() {
    let (app, dir) = spooled_app(|_| {}).await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = open(&app, &stream_id, &participation.id).await;
    for b in 0..5 {
        tx.send(frames::batch(sentiments(100 * b, 100)))
            .await
            .unwrap();
    }
    eventually("the stream spills to a file", || async {
        spill_files(dir.path()) == 1
    })
    .await;
    assert_eq!(open_transactions(&app.db).await, 0);
    tx.send(frames::trailer(500)).await.unwrap();
    drop(tx);
    assert_eq!(call.await.unwrap().unwrap().items_stored, 500);
    assert_eq!(stored(&app, &stream_id).await, (500, 500));
    assert_eq!(spill_files(dir.path()), 0);
}

#[tokio::test]
async fn without_memory_budget_every_batch_spills_and_the_stream_commits_exactly() {
    let (app, dir) = spooled_app(|settings| settings.spool.memory_bytes = 0).await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = open(&app, &stream_id, &participation.id).await;
    tx.send(frames::batch(sentiments(0, 2))).await.unwrap();
    eventually("two items spill to a file", || async {
        spill_files(dir.path()) == 1
    })
    .await;
    tx.send(frames::batch(sentiments(2, 3))).await.unwrap();
    tx.send(frames::trailer(5)).await.unwrap();
    drop(tx);
    assert_eq!(call.await.unwrap().unwrap().items_stored, 5);
    assert_eq!(stored(&app, &stream_id).await, (5, 5));
    assert_eq!(spill_files(dir.path()), 0);
}

#[tokio::test]
async fn a_cancelled_spilled_stream_stores_nothing_and_its_file_is_removed() {
    let (app, dir) = spooled_app(|_| {}).await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = open(&app, &stream_id, &participation.id).await;
    tx.send(frames::batch(sentiments(0, 300))).await.unwrap();
    eventually("the stream spills to a file", || async {
        spill_files(dir.path()) == 1
    })
    .await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    eventually("the cancelled stream's file is removed", || async {
        spill_files(dir.path()) == 0
    })
    .await;
    drop(tx);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM ingest_streams").await,
        0
    );
}

#[tokio::test]
async fn a_spilled_stream_whose_connection_is_lost_stores_nothing_and_its_file_is_removed() {
    let (app, dir) = spooled_app(|_| {}).await;
    let participation = app.participation().await;
    // A client of its own connection, which goes away with it.
    let channel = crate::helpers::connect(app.address).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(frames::header(
        &Uuid::new_v4().to_string(),
        &participation.id,
    ))
    .await
    .unwrap();
    tx.send(frames::batch(sentiments(0, 300))).await.unwrap();
    let call = tokio::spawn(async move {
        proto::ingest_service_client::IngestServiceClient::new(channel)
            .stream_sentiments(ReceiverStream::new(rx))
            .await
    });
    eventually("the stream spills to a file", || async {
        spill_files(dir.path()) == 1
    })
    .await;
    // Dropping the call's task drops the only handle on its connection: it closes.
    call.abort();
    let _ = call.await;
    drop(tx);
    eventually("the lost stream's file is removed", || async {
        spill_files(dir.path()) == 0
    })
    .await;
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(
        count(&app.db, "SELECT count(*) FROM ingest_streams").await,
        0
    );
}

fn assert_refused(status: &Status, says: &str, retry: bool) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(says), "{}", status.message());
    assert_eq!(
        status.get_error_details().retry_info().is_some(),
        retry,
        "{status:?}"
    );
}

#[tokio::test]
async fn a_full_spool_is_resource_exhausted_and_the_server_stays_healthy() {
    let (app, dir) = spooled_app(|settings| settings.spool.disk_bytes = 64 * 1024).await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = open(&app, &stream_id, &participation.id).await;
    // About 260 KB of rows: more than the spool's 64 KiB of disk.
    tx.send(frames::batch(sentiments(0, 2000))).await.unwrap();
    let status = call.await.unwrap().unwrap_err();
    assert_refused(&status, "spool", true);
    drop(tx);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(spill_files(dir.path()), 0);

    // What fits still commits, and health says SERVING.
    let receipt = app
        .stream_sentiments(&participation.id, vec![sentiments(0, 10)])
        .await;
    assert_eq!(receipt.items_stored, 10);
    crate::helpers::assert_serving(&app.channel).await;
}

#[tokio::test]
async fn a_stream_over_the_byte_limit_is_refused_without_retry() {
    let (app, _dir) = spooled_app(|settings| settings.spool.max_stream_bytes = 10_000).await;
    let participation = app.participation().await;
    let messages = frames::stream(
        &Uuid::new_v4().to_string(),
        &participation.id,
        vec![sentiments(0, 50), sentiments(50, 50)],
    );
    let status = app
        .client
        .clone()
        .stream_sentiments(tokio_stream::iter(messages))
        .await
        .unwrap_err();
    assert_refused(&status, "10000 bytes", false);
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
}

#[tokio::test]
async fn a_bulk_upload_that_falls_silent_gives_its_connection_back_and_commits_exactly() {
    let (app, dir) = spooled_app(|settings| {
        settings.limits = Limits {
            stream_writer_idle: Duration::from_secs(2),
            ..Limits::default()
        }
    })
    .await;
    let participation = app.participation().await;
    let stream_id = Uuid::new_v4().to_string();
    let (tx, call) = open(&app, &stream_id, &participation.id).await;
    tx.send(frames::batch(sentiments(0, BULK_ITEMS)))
        .await
        .unwrap();
    eventually("the bulk upload is written as it arrives", || async {
        open_transactions(&app.db).await == 1
    })
    .await;
    // The client falls silent: the stream gives its connection back, rows and all
    // rolled back, and keeps what it received in its spill file.
    eventually("the silent stream gives its connection back", || async {
        open_transactions(&app.db).await == 0
    })
    .await;
    assert_eq!(count(&app.db, "SELECT count(*) FROM sentiments").await, 0);
    assert_eq!(spill_files(dir.path()), 1);
    tx.send(frames::batch(sentiments(BULK_ITEMS as i64, 10)))
        .await
        .unwrap();
    tx.send(frames::trailer(BULK_ITEMS as u64 + 10))
        .await
        .unwrap();
    drop(tx);
    let receipt = call.await.unwrap().unwrap();
    assert_eq!(receipt.items_stored, BULK_ITEMS as u64 + 10);
    let rows = BULK_ITEMS as i64 + 10;
    assert_eq!(stored(&app, &stream_id).await, (rows, rows));
    assert_eq!(spill_files(dir.path()), 0);
}

#[tokio::test]
async fn a_killed_servers_spill_files_are_removed_when_a_server_starts() {
    let db = fresh_database().await;
    let (_root, data_dir) = crate::helpers::fresh_data_dir();
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().to_str().unwrap().to_owned();
    let url = crate::item_times::url_of(&db).await;
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("KRISP_SPOOL_DIR", &spool_dir),
    ];
    let (mut child, address, _lines, _) = crate::binary::start_logged(&data_dir, &env);
    let app = TestApp::connect(address, db.clone()).await;
    let participation = app.participation().await;
    let (tx, call) = open(&app, &Uuid::new_v4().to_string(), &participation.id).await;
    tx.send(frames::batch(sentiments(0, 300))).await.unwrap();
    eventually("the stream spills to a file", || async {
        spill_files(spool.path()) == 1
    })
    .await;

    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    signal::kill(pid, signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let _ = call.await;
    drop(tx);
    // The killed server could not clean up: its file is still there.
    assert_eq!(spill_files(spool.path()), 1);

    let (child, _, lines, logged) = crate::binary::start_logged(&data_dir, &env);
    assert_eq!(spill_files(spool.path()), 0);
    assert!(
        logged
            .iter()
            .any(|line| line.contains("removed the spools")),
        "{logged:#?}"
    );
    let exit = crate::binary::terminate(child, &lines).await;
    assert!(
        exit.success(),
        "{exit:?}: {:#?}",
        lines.try_iter().collect::<Vec<_>>()
    );
    assert_eq!(count(&db, "SELECT count(*) FROM sentiments").await, 0);
    // A server that stops cleanly leaves nothing behind either.
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0);
}
