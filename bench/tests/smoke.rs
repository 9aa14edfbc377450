//! The benchmark binary keeps working (a smoke run on tiny sizes; its numbers are not
//! looked at here: speed is measured by running it, never asserted in tests).

use std::{process::Command, sync::Mutex};

/// Every run recreates the one benchmark database: one at a time.
static BENCH_DATABASE: Mutex<()> = Mutex::new(());

#[test]
fn the_benchmark_runs_every_method_and_reports_the_ratio() {
    let _one_at_a_time = BENCH_DATABASE.lock().unwrap_or_else(|e| e.into_inner());
    let chart = tempfile::NamedTempFile::new().unwrap();
    let live_chart = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_krisp-bench"))
        .args([
            "--rows",
            "4000",
            "--row-by-row-rows",
            "200",
            "--unary-requests",
            "200",
        ])
        .args([
            "--unary-concurrency",
            "1,4",
            "--streams",
            "1,2",
            "--rss-rows",
            "4000",
        ])
        .args([
            "--delete-table-rows",
            "20000",
            "--delete-streams",
            "4",
            "--delete-stream-rows",
            "50",
        ])
        .args(["--read-entries", "3000"])
        .args([
            "--live-feeds",
            "20",
            "--live-min-seconds",
            "2",
            "--live-max-seconds",
            "3",
        ])
        .args(["--repeat", "1", "--chart"])
        .arg(chart.path())
        .arg("--live-chart")
        .arg(live_chart.path())
        .output()
        .expect("run krisp-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "krisp-bench failed:\n{stdout}\n{stderr}"
    );
    for method in [
        "| copy | 1 |",
        "| copy | 2 |",
        "| row-by-row |",
        "| grpc-stream | 2 |",
        "| grpc-unary | 4 |",
        "| sqlx-insert | 4 |",
        "| grpc-health | 4 |",
        "| grpc-get-user | 4 |",
        "| sqlx-get-user | 4 |",
        "| grpc-join-session | 4 |",
        "| sqlx-join-session | 4 |",
        "| grpc-timeline-first | 1 |",
        "| sqlx-timeline-first | 1 |",
        "| live-feed | 1 |",
    ] {
        assert!(stdout.contains(method), "{method} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("server RSS while streaming 4000 rows"),
        "{stdout}"
    );
    assert!(
        stdout.contains("delete-user 4x50 in a 0.02M-row table: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("grpc-unary/grpc-health (the floor) ratio at concurrency 4: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("grpc-timeline-first/sqlx-timeline-first ratio at concurrency 4: "),
        "{stdout}"
    );
    assert!(
        stdout.contains("copy without / with the stream keys"),
        "{stdout}"
    );
    assert!(stdout.contains("\nstream/copy ratio: "), "{stdout}");
    for method in [
        "| copy-to | 1 | 3000 |",
        "| grpc-read | 1 | 3000 |",
        "| grpc-range | 1 |",
        "| sqlx-range | 1 |",
    ] {
        assert!(stdout.contains(method), "{method} missing:\n{stdout}");
    }
    assert!(stdout.contains("grpc-range/sqlx-range ratio ("), "{stdout}");
    // The Python reader runs where python3 has grpcio (the README's test command installs
    // it first).
    let python = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    assert_eq!(
        stdout.contains("| python-read | 1 | 3000 |"),
        python,
        "python-read with grpcio installed: {python}\n{stdout}\n{stderr}"
    );
    for (kind, finished) in [
        ("Stream", "| stream records |"),
        ("LiveFeed", "| feeds closed |"),
    ] {
        assert!(stdout.contains(&format!("live feeds, {kind}:")), "{stdout}");
        let table = stdout
            .split(&format!("live feeds, {kind}:"))
            .nth(1)
            .unwrap_or_default();
        let row = table
            .lines()
            .find(|l| l.starts_with(finished))
            .unwrap_or_default();
        assert_eq!(row, format!("{finished} 20 | 20 |"), "{stdout}");
    }
    let live_svg = std::fs::read_to_string(live_chart.path()).unwrap();
    assert!(
        live_svg.contains("20 client streams") && live_svg.contains("20 LiveFeeds"),
        "{live_svg}"
    );
    let svg = std::fs::read_to_string(chart.path()).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("grpc-stream x2"),
        "{svg}"
    );
}

#[test]
fn every_live_feed_helper_is_measured_pipelined_and_one_append_at_a_time_traces_on() {
    let _one_at_a_time = BENCH_DATABASE.lock().unwrap_or_else(|e| e.into_inner());
    let output = Command::new(env!("CARGO_BIN_EXE_krisp-bench"))
        .args(["--repeat", "1", "--server-metrics", "--traces"])
        .args(["helpers", "--items", "2000", "--per-append", "50"])
        .output()
        .expect("run krisp-bench helpers");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "krisp-bench helpers failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("one feed of 2000 items in appends of 50"),
        "{stdout}"
    );
    // The server under test recorded metrics and exported its spans to the sink.
    let spans: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("traces: on, "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no traces line:\n{stdout}"));
    assert!(spans > 0, "{stdout}");
    for helper in ["rust", "python-sync", "python-asyncio", "typescript"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {helper} |")))
            .unwrap_or_else(|| panic!("no {helper} row:\n{stdout}"));
        // Both rates measured: neither column is zero.
        let rates: Vec<f64> = row
            .split('|')
            .filter_map(|cell| cell.split_whitespace().next()?.parse().ok())
            .collect();
        assert!(rates.len() == 2 && rates.iter().all(|r| *r > 0.0), "{row}");
    }
}
