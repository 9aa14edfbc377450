//! The README's client commands, as a user runs them, against a server on the coordinator.

use std::process::Command;

use crate::{citus::shared_app, require_citus};

fn client(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_krisp-ingest"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run krisp-ingest");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "krisp-ingest {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_demo_and_a_live_feed_run_against_the_coordinator() {
    let cluster = require_citus!();
    let (_shared, _, app) = shared_app(cluster).await;
    let server = format!("http://{}", app.address);
    let (demo, feed) = tokio::task::spawn_blocking(move || {
        let demo = client(&["demo", "--server", &server]);
        let feed = client(&["feed", "--live", "--count", "2000", "--server", &server]);
        (demo, feed)
    })
    .await
    .unwrap();
    assert!(demo.contains("timeline of participation"), "{demo}");
    assert!(feed.contains("closed: 2000 sentiments"), "{feed}");
}
