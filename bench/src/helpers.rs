//! `krisp-bench helpers`: one live feed of `--items` sentiments in appends of
//! `--per-append` through each client library's live-feed helper (Rust in process;
//! Python sync and asyncio, TypeScript in processes of their own), pipelined with the
//! helper's default window beside the same feed with one append in flight. Each run is
//! timed by its client from the first append to the feed's close (not the interpreter's
//! start); the rows are checked in PostgreSQL.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, ValueEnum};
use krisp_ingest::domain::Participation;
use krisp_ingest_client::{
    FeedOptions, LiveFeed,
    proto::{self, feed_item::Item},
};
use uuid::Uuid;

use crate::{
    Args,
    fixtures::{Fixtures, Measurement, settle},
    probes::Cpu,
    reads::count_and_seconds,
    report::medians,
    server::Server,
};

#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct HelperArgs {
    /// Items of each feed.
    #[arg(long, default_value_t = 100_000)]
    items: u64,
    /// Items per append.
    #[arg(long, default_value_t = 100)]
    per_append: u64,
    /// The helpers to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Language::Rust, Language::Python, Language::Node])]
    languages: Vec<Language>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Language {
    Rust,
    Python,
    Node,
}

/// A helper and how it sends: pipelined (its default window) or one append in flight.
struct Case {
    name: &'static str,
    language: Language,
    /// The flavour the driver script runs (`sync`, `asyncio`; empty for Rust and Node).
    flavour: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "rust",
        language: Language::Rust,
        flavour: "",
    },
    Case {
        name: "python-sync",
        language: Language::Python,
        flavour: "sync",
    },
    Case {
        name: "python-asyncio",
        language: Language::Python,
        flavour: "asyncio",
    },
    Case {
        name: "typescript",
        language: Language::Node,
        flavour: "",
    },
];

pub(crate) async fn run(args: &Args, helpers: &HelperArgs) -> anyhow::Result<()> {
    let (pool, _) = crate::bench_database(args).await?;
    let fx = Arc::new(Fixtures::new(pool.clone(), helpers.items).await?);
    let node = if helpers.languages.contains(&Language::Node) {
        Some(node_package()?)
    } else {
        None
    };
    if helpers.languages.contains(&Language::Python) {
        python_package()?;
    }
    let server = Server::start(args, 16).await?;
    let mut runs = Vec::new();
    for round in 1..=args.repeat {
        for case in CASES
            .iter()
            .filter(|c| helpers.languages.contains(&c.language))
        {
            for window in [Window::Pipelined, Window::One] {
                eprintln!("round {round}: {} {} ...", case.name, window.name());
                settle(&fx.pool).await?;
                let participation = fx.participation().await?;
                let elapsed = match case.language {
                    Language::Rust => rust(&fx, &server, &participation, helpers, window).await?,
                    Language::Python | Language::Node => {
                        script(
                            case,
                            node.as_deref(),
                            &fx,
                            &server,
                            &participation,
                            helpers,
                            window,
                        )
                        .await?
                    }
                };
                let stored = fx.stored(&participation).await?;
                anyhow::ensure!(
                    stored == helpers.items,
                    "{} {}: {stored} of {} items stored",
                    case.name,
                    window.name(),
                    helpers.items
                );
                runs.push(Measurement {
                    method: format!("{} {}", case.name, window.name()),
                    concurrency: 1,
                    rows: helpers.items,
                    elapsed,
                    latency: None,
                    cpu: Cpu::default(),
                });
            }
        }
    }
    server.stop().await?;
    print!("{}", report(helpers, args.repeat, medians(runs)));
    pool.close().await;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Window {
    Pipelined,
    One,
}

impl Window {
    fn name(self) -> &'static str {
        match self {
            Window::Pipelined => "pipelined",
            Window::One => "one-in-flight",
        }
    }

    /// Appends in flight at most.
    fn appends(self) -> usize {
        match self {
            Window::Pipelined => FeedOptions::default().window_appends,
            Window::One => 1,
        }
    }
}

async fn rust(
    fx: &Fixtures,
    server: &Server,
    participation: &Participation,
    helpers: &HelperArgs,
    window: Window,
) -> anyhow::Result<Duration> {
    let client = krisp_ingest_client::with_channel(server.channel().await?, None)?;
    let options = FeedOptions {
        window_appends: window.appends(),
        ..FeedOptions::default()
    };
    let appends: Vec<Vec<proto::FeedItem>> = (0..helpers.items)
        .step_by(usize::try_from(helpers.per_append)?)
        .map(|first| {
            (first..(first + helpers.per_append).min(helpers.items))
                .map(|i| proto::FeedItem {
                    item: Some(Item::Sentiment(fx.proto_sentiment(i))),
                })
                .collect()
        })
        .collect();
    let feed_id = Uuid::new_v4().to_string();
    let mut feed = LiveFeed::new(client, feed_id, participation.id.to_string(), options);
    let started = Instant::now();
    for items in appends {
        feed.append(items).await?;
    }
    let closed = feed.close().await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(closed.items_stored == helpers.items, "closed at {closed:?}");
    Ok(elapsed)
}

/// Runs the Python or TypeScript driver beside this crate; it prints `<items> <seconds>`.
async fn script(
    case: &Case,
    node: Option<&Path>,
    fx: &Fixtures,
    server: &Server,
    participation: &Participation,
    helpers: &HelperArgs,
    window: Window,
) -> anyhow::Result<Duration> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = match (case.language, node) {
        (Language::Python, _) => {
            let mut python = tokio::process::Command::new("python3");
            python
                .arg(here.join("feed_helper.py"))
                .env("PYTHONPATH", here.join("../clients/python/src"));
            python.arg(case.flavour);
            python
        }
        (Language::Node, Some(package)) => {
            let mut node = tokio::process::Command::new("node");
            node.arg(here.join("feed_helper.mjs")).arg(package);
            node
        }
        _ => bail!("no driver for {}", case.name),
    };
    command
        .arg(server.address.to_string())
        .arg(participation.id.to_string())
        .arg(helpers.items.to_string())
        .arg(helpers.per_append.to_string())
        .arg(window.appends().to_string())
        .arg(fx.base.timestamp().to_string());
    let (items, elapsed) = count_and_seconds(case.name, &mut command).await?;
    anyhow::ensure!(items == helpers.items, "{} closed at {items}", case.name);
    Ok(elapsed)
}

/// Generates the Python client's stubs into its source tree (the driver imports it from
/// there); python3 needs the tools of clients/python/requirements.txt.
fn python_package() -> anyhow::Result<()> {
    let generate = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python/generate.sh");
    let status = std::process::Command::new(&generate)
        .status()
        .with_context(|| format!("cannot run {}", generate.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} failed (pip install -r clients/python/requirements.txt)",
        generate.display()
    );
    Ok(())
}

/// The TypeScript client, built (npm ci, npm run build) when it is not yet.
fn node_package() -> anyhow::Result<PathBuf> {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/node");
    let index = package.join("dist/src/index.js");
    if !index.exists() {
        for step in [
            &["ci", "--no-audit", "--no-fund"][..],
            &["run", "build"][..],
        ] {
            let status = std::process::Command::new("npm")
                .args(step)
                .current_dir(&package)
                .status()
                .context("npm is not installed")?;
            anyhow::ensure!(
                status.success(),
                "npm {step:?} failed in {}",
                package.display()
            );
        }
    }
    Ok(index)
}

fn report(helpers: &HelperArgs, rounds: usize, rows: Vec<(Measurement, f64, f64)>) -> String {
    let mut out = format!(
        "\nlive-feed helpers: one feed of {} items in appends of {} (medians of {rounds} rounds)\n\n\
         | helper | pipelined items/s (range) | one in flight items/s (range) | pipelined / one in flight |\n\
         | --- | ---: | ---: | ---: |\n",
        helpers.items, helpers.per_append
    );
    for case in CASES
        .iter()
        .filter(|c| helpers.languages.contains(&c.language))
    {
        let rate = |window: Window| {
            let method = format!("{} {}", case.name, window.name());
            rows.iter()
                .find(|(m, _, _)| m.method == method)
                .map_or((0.0, 0.0, 0.0), |(m, low, high)| {
                    (m.rows_per_second(), *low, *high)
                })
        };
        let (pipelined, one) = (rate(Window::Pipelined), rate(Window::One));
        out += &format!(
            "| {} | {:.0} ({:.0}-{:.0}) | {:.0} ({:.0}-{:.0}) | {:.1}x |\n",
            case.name,
            pipelined.0,
            pipelined.1,
            pipelined.2,
            one.0,
            one.1,
            one.2,
            pipelined.0 / one.0.max(1e-9)
        );
    }
    out
}
