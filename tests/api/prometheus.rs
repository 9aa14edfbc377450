//! The rules, the alerts and the dashboard of `deploy/` against Prometheus itself:
//! promtool's checks and the rules' unit tests, then a real Prometheus (Debian's
//! `prometheus`, which `.ci/run` installs) scraping a live server under a short load of
//! every kind, asked for every recording rule, every alert's expression (its threshold
//! left out) and every dashboard panel's query: each must return series, so that a
//! renamed metric or a wrong label breaks the suite.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{TestApp, eventually, fresh_database, sentiments};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn promtool(args: &[&Path]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed (Debian's prometheus package; .ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every `- alert:` of the rules file.
fn alert_names(rules: &str) -> Vec<String> {
    let alert = Regex::new(r"(?m)^\s*- alert: (\w+)$").unwrap();
    alert
        .captures_iter(rules)
        .map(|c| c[1].to_owned())
        .collect()
}

#[test]
fn promtool_checks_the_rules_and_the_config_and_every_alert_is_unit_tested() {
    let rules = deploy("prometheus/krisp-ingest.rules.yml");
    let config = deploy("prometheus/prometheus.yml");
    let tests = deploy("prometheus/krisp-ingest.rules.test.yml");
    promtool(&[Path::new("check"), Path::new("rules"), &rules]);
    promtool(&[Path::new("check"), Path::new("config"), &config]);
    let tested = promtool(&[Path::new("test"), Path::new("rules"), &tests]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    let test_text = std::fs::read_to_string(&tests).unwrap();
    let alerts = alert_names(&std::fs::read_to_string(&rules).unwrap());
    assert!(alerts.len() >= 9, "{alerts:?}");
    for alert in alerts {
        assert!(
            test_text.contains(&format!("alertname: {alert}\n")),
            "{alert} has no unit test"
        );
    }
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Prometheus with a configuration of the test's own: the repository's rules, a 1 s
/// scrape and evaluation of `target`.
struct Prometheus {
    child: Child,
    address: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: krisp-ingest\n    static_configs:\n      - targets: [\"{target}\"]\n",
                deploy("prometheus/krisp-ingest.rules.yml").display()
            ),
        )
        .unwrap();
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (Debian's prometheus package; .ci/run installs it)");
        Self {
            child,
            address,
            _dir: dir,
        }
    }

    /// The series `expr` returns now (an instant query).
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let body = get(
            self.address,
            &format!("/api/v1/query?query={}", encode(expr)),
        )
        .await;
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(answer["status"], "success", "{expr}: {body}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The body of `GET path` (HTTP/1.0: no chunking; "" when nothing answers yet).
async fn get(address: SocketAddr, path: &str) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// An alert's expression without its threshold (`> 0.05`, `== 0`): the series it
/// compares, which exist whether it fires or not.
fn without_threshold(expr: &str) -> String {
    let threshold = Regex::new(r"\s*(==|!=|>=|<=|>|<)\s*[0-9][0-9.\s*]*").unwrap();
    threshold.replace_all(expr, " ").trim().to_owned()
}

/// Every `record:`, and every alert's `expr:` without its threshold, of the rules file.
fn rule_queries(rules: &str) -> Vec<String> {
    let record = Regex::new(r"(?m)^\s*- record: (\S+)$").unwrap();
    let alert_expr = Regex::new(r"(?m)^\s*- alert: \w+\n\s*expr: (.+)$").unwrap();
    record
        .captures_iter(rules)
        .map(|c| c[1].to_owned())
        .chain(
            alert_expr
                .captures_iter(rules)
                .map(|c| without_threshold(&c[1])),
        )
        .collect()
}

/// Every panel query of the dashboard.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("grafana/krisp-ingest.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 12, "{} panels", panels.len());
    panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn thresholds_are_left_out_of_alert_expressions_only() {
    assert_eq!(
        without_threshold("krisp:grpc_server_errors:ratio_rate5m > 0.05"),
        "krisp:grpc_server_errors:ratio_rate5m"
    );
    assert_eq!(
        without_threshold("time() - krisp_x > 3 * 3600"),
        "time() - krisp_x"
    );
    assert_eq!(
        without_threshold("increase(a{o=\"f\"}[1h]) > 0 and ignoring (o) increase(a[1h]) == 0"),
        "increase(a{o=\"f\"}[1h]) and ignoring (o) increase(a[1h])"
    );
}

#[tokio::test]
async fn a_real_prometheus_finds_series_for_every_rule_alert_and_panel() {
    let db = fresh_database().await;
    let served = crate::binary::serve_database(&db, &[]).await;
    let metrics = crate::binary::metrics_address(&served.logged);
    let prometheus = Prometheus::start(metrics);
    let app = TestApp::connect(served.address, db.clone()).await;

    // A short load of every kind: unary calls, a client stream, a live feed, a read, a
    // refused call.
    let participation = app.participation().await;
    app.stream_sentiments(&participation.id, vec![sentiments(0, 50)])
        .await;
    crate::client_feed::feed_through(
        &app,
        &participation.id,
        vec![vec![crate::live::item(1), crate::live::item(2)]],
    )
    .await;
    let (entries, _) =
        crate::timeline::read(&app, crate::timeline::request(&participation.id)).await;
    assert_eq!(entries.len(), 52);
    let refused = app.get_unknown_user().await;
    assert_eq!(refused.code(), tonic::Code::NotFound);

    // Scraped twice at least after the load, and the rules evaluated on it.
    eventually("Prometheus has scraped the load and evaluated the rules", || {
        let prometheus = &prometheus;
        async move {
            !prometheus
                .query("count_over_time(grpc_server_handled_total{grpc_method=\"GetUser\"}[1m]) >= 2")
                .await
                .is_empty()
                && !prometheus.query("krisp:live_feed_ack_seconds:p99_rate5m").await.is_empty()
        }
    })
    .await;

    let rules = std::fs::read_to_string(deploy("prometheus/krisp-ingest.rules.yml")).unwrap();
    let queries: Vec<String> = rule_queries(&rules)
        .into_iter()
        .chain(dashboard_queries())
        .collect();
    let mut empty = Vec::new();
    for query in &queries {
        if prometheus.query(query).await.is_empty() {
            empty.push(query.clone());
        }
    }
    assert!(empty.is_empty(), "no series for:\n{}", empty.join("\n"));
    // And the series carry what the rules group by.
    let handled = prometheus
        .query("krisp:grpc_server_handled:rate5m{grpc_method=\"GetUser\", grpc_code=\"NotFound\"}")
        .await;
    assert_eq!(handled.len(), 1, "{handled:?}");
    assert_eq!(
        handled[0]["metric"]["grpc_service"],
        "krisp.ingest.v1.IngestService"
    );

    drop(app);
    assert!(
        crate::binary::terminate(served.child, &served.lines)
            .await
            .success()
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
}
