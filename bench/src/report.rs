//! The report of a run: the median round of each measurement, the ratios, the live feeds'
//! rounds (Markdown on standard output), and the charts (SVG).

use std::{fmt::Write as _, time::Duration};

use crate::{
    Args,
    fixtures::Measurement,
    live::{self, LiveArgs, Round},
};

/// What one run of the whole benchmark measured.
pub(crate) struct Run {
    /// The median round of each (method, concurrency), with the range of rows/s.
    pub(crate) results: Vec<(Measurement, f64, f64)>,
    pub(crate) rss: Rss,
    /// COPY's rows/s without and with the stream keys migration 0004 dropped.
    pub(crate) stream_keys: (f64, f64),
    /// DeleteUser's time in each round, sorted.
    pub(crate) delete_times: Vec<Duration>,
    /// Entries of the timeline range read by `grpc-range` and `sqlx-range`.
    pub(crate) range_entries: u64,
    /// The live feeds of each kind, every round.
    pub(crate) live: Vec<(LiveArgs, Vec<Round>)>,
}

/// The server's memory during one long stream.
pub(crate) struct Rss {
    pub(crate) rows: u64,
    pub(crate) elapsed: Duration,
    pub(crate) idle_kib: u64,
    pub(crate) peak_kib: u64,
    pub(crate) hwm_kib: u64,
}

impl Run {
    fn at(&self, method: &str, concurrency: usize) -> f64 {
        self.results
            .iter()
            .find(|(m, _, _)| m.method == method && m.concurrency == concurrency)
            .map_or(0.0, |(m, _, _)| m.rows_per_second())
    }

    fn best(&self, method: &str) -> f64 {
        self.results
            .iter()
            .filter(|(m, _, _)| m.method == method)
            .map(|(m, _, _)| m.rows_per_second())
            .fold(0.0, f64::max)
    }
}

/// The median round of each (method, concurrency), with the spread of rows/s.
pub(crate) fn medians(runs: Vec<Measurement>) -> Vec<(Measurement, f64, f64)> {
    let mut keys: Vec<(String, usize)> = Vec::new();
    for m in &runs {
        let key = (m.method.clone(), m.concurrency);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut runs: Vec<Option<Measurement>> = runs.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for (method, concurrency) in keys {
        let mut group: Vec<Measurement> = runs
            .iter_mut()
            .filter(|m| {
                m.as_ref()
                    .is_some_and(|m| m.method == method && m.concurrency == concurrency)
            })
            .filter_map(Option::take)
            .collect();
        group.sort_by(|a, b| a.rows_per_second().total_cmp(&b.rows_per_second()));
        let low = group.first().map_or(0.0, Measurement::rows_per_second);
        let high = group.last().map_or(0.0, Measurement::rows_per_second);
        let middle = group.len() / 2;
        if let Some(median) = group.into_iter().nth(middle) {
            out.push((median, low, high));
        }
    }
    out
}

/// The report in Markdown: the table of every measurement, then the ratios, memory,
/// DeleteUser and the live feeds.
pub(crate) fn markdown(args: &Args, run: &Run) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| method | concurrency | rows | seconds | rows/s (median of {}) | rows/s range | p50 | p99 | CPU s client | CPU s server | CPU s postgres | server CPU us/row |",
        args.repeat
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    for (m, low, high) in &run.results {
        let (p50, p99) = m
            .latency
            .map_or_else(|| (String::new(), String::new()), |(a, b)| (ms(a), ms(b)));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.0} | {low:.0}-{high:.0} | {p50} | {p99} | {:.2} | {:.2} | {:.2} | {:.0} |",
            m.method,
            m.concurrency,
            m.rows,
            m.elapsed.as_secs_f64(),
            m.rows_per_second(),
            m.cpu.client,
            m.cpu.server,
            m.cpu.postgres,
            m.cpu.server / (m.rows.max(1) as f64) * 1e6,
        );
    }
    let _ = writeln!(out);
    let rss = &run.rss;
    let _ = writeln!(
        out,
        "server RSS while streaming {} rows in one stream ({:.1} s): idle {:.1} MiB, peak sampled {:.1} MiB, high-water mark {:.1} MiB",
        rss.rows,
        rss.elapsed.as_secs_f64(),
        rss.idle_kib as f64 / 1024.0,
        rss.peak_kib as f64 / 1024.0,
        rss.hwm_kib as f64 / 1024.0
    );
    let mut ratio = |what: String, a: f64, b: f64| {
        let _ = writeln!(out, "{what}: {:.2}", a / b.max(1e-9));
    };
    for &n in &args.streams {
        ratio(
            format!("grpc-stream/copy ratio at concurrency {n}"),
            run.at("grpc-stream", n),
            run.at("copy", n),
        );
    }
    ratio(
        "live-feed (one feed, pipelined appends)/copy ratio at concurrency 1".into(),
        run.at("live-feed", 1),
        run.at("copy", 1),
    );
    ratio(
        "grpc-stream/row-by-row ratio".into(),
        run.best("grpc-stream"),
        run.best("row-by-row"),
    );
    for &case in &args.unary_cases {
        let (grpc, sql) = case.methods();
        for &c in &args.unary_concurrency {
            ratio(
                format!("{grpc}/{sql} ratio at concurrency {c}"),
                run.at(grpc, c),
                run.at(sql, c),
            );
        }
        for &c in &args.unary_concurrency {
            ratio(
                format!("{grpc}/grpc-health (the floor) ratio at concurrency {c}"),
                run.at(grpc, c),
                run.at("grpc-health", c),
            );
        }
    }
    if run.at("grpc-read", 1) > 0.0 {
        ratio(
            "grpc-read/copy-to ratio".into(),
            run.at("grpc-read", 1),
            run.at("copy-to", 1),
        );
        let python = run.at("python-read", 1);
        if python > 0.0 {
            ratio(
                format!("python-read {python:.0} entries/s; python-read/copy-to ratio"),
                python,
                run.at("copy-to", 1),
            );
        }
        ratio(
            format!(
                "grpc-range/sqlx-range ratio ({} entries a read)",
                run.range_entries
            ),
            run.at("grpc-range", 1),
            run.at("sqlx-range", 1),
        );
    }
    let (without, with) = run.stream_keys;
    ratio(
        format!(
            "copy without / with the stream keys (dropped by migration 0004): {without:.0} / {with:.0} rows/s, ratio"
        ),
        without,
        with,
    );
    if let Some(median) = run.delete_times.get(run.delete_times.len() / 2) {
        let rounds: Vec<String> = run
            .delete_times
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect();
        let _ = writeln!(
            out,
            "delete-user {}x{} in a {}M-row table: {:.3} s (median of {}; rounds {})",
            args.delete_streams,
            args.delete_stream_rows,
            args.delete_table_rows as f64 / 1e6,
            median.as_secs_f64(),
            run.delete_times.len(),
            rounds.join(", ")
        );
    }
    // Each side at its best concurrency.
    let _ = writeln!(
        out,
        "stream/copy ratio: {:.2}",
        run.best("grpc-stream") / run.best("copy").max(1e-9)
    );
    for (shape, rounds) in &run.live {
        let _ = writeln!(out, "\nlive feeds, {:?}:\n", shape.rpc);
        out.push_str(&live::report(shape, rounds));
    }
    out
}

/// Horizontal bars, one panel per scenario, each on its own scale.
struct Panel {
    title: String,
    unit: &'static str,
    bars: Vec<(String, f64, &'static str)>,
}

const GREY: &str = "#888";
const BLUE: &str = "#2a7ae2";
const ORANGE: &str = "#e2a72a";
const GREEN: &str = "#3a9a5b";

fn svg(title: &str, panels: &[Panel], log_scale: bool) -> String {
    let (row, left, width) = (20.0, 230.0, 420.0);
    let height: f64 = panels
        .iter()
        .map(|p| 30.0 + row * p.bars.len() as f64)
        .sum::<f64>()
        + 40.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{height:.0}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\">{title}</text>\n"
    );
    // A log scale is shared by every panel, so that their bars compare.
    let overall = panels
        .iter()
        .flat_map(|p| p.bars.iter().map(|b| b.1))
        .fold(1e-9, f64::max);
    let mut y = 40.0;
    for panel in panels {
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{:.1}\" font-size=\"13\" font-weight=\"bold\">{} ({})</text>",
            y + 12.0,
            panel.title,
            panel.unit
        );
        y += 22.0;
        let max = if log_scale {
            overall
        } else {
            panel.bars.iter().map(|b| b.1).fold(1e-9, f64::max)
        };
        let scale = |v: f64| {
            if log_scale {
                // From 0.1 to the panel's maximum, in decades.
                let (low, high) = (0.1f64.log10(), max.max(1.0).log10());
                ((v.max(0.1).log10() - low) / (high - low).max(1e-9)).clamp(0.0, 1.0)
            } else {
                v / max
            }
        };
        for (label, value, color) in &panel.bars {
            let w = scale(*value) * width;
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>\
                 <rect x=\"{left}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"15\" fill=\"{color}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                left - 6.0,
                y + 12.0,
                left + w + 4.0,
                y + 12.0,
                if *value >= 100.0 {
                    format!("{value:.0}")
                } else {
                    format!("{value:.1}")
                },
            );
            y += row;
        }
        y += 8.0;
    }
    out.push_str("</svg>\n");
    out
}

/// Throughput by concurrency: the bulk loads, then each unary case beside its
/// direct-SQL side and the floor.
pub(crate) fn throughput_chart(run: &Run) -> String {
    let bar = |m: &Measurement, color| {
        (
            format!("{} x{}", m.method, m.concurrency),
            m.rows_per_second(),
            color,
        )
    };
    let color = |method: &str| match method {
        "copy" | "row-by-row" | "copy-to" => GREY,
        "python-read" => ORANGE,
        "grpc-health" => GREEN,
        m if m.starts_with("sqlx") => GREY,
        m if m.starts_with("live") => ORANGE,
        _ => BLUE,
    };
    let whole_reads = ["copy-to", "grpc-read", "python-read"];
    let bulk: Vec<_> = run
        .results
        .iter()
        .filter(|(m, _, _)| m.latency.is_none() && !whole_reads.contains(&m.method.as_str()))
        .map(|(m, _, _)| bar(m, color(&m.method)))
        .collect();
    let reads: Vec<_> = run
        .results
        .iter()
        .filter(|(m, _, _)| whole_reads.contains(&m.method.as_str()))
        .map(|(m, _, _)| bar(m, color(&m.method)))
        .collect();
    let mut panels = vec![Panel {
        title: "bulk: sentiments loaded".into(),
        unit: "rows/s",
        bars: bulk,
    }];
    if !reads.is_empty() {
        panels.push(Panel {
            title: "a whole timeline read".into(),
            unit: "entries/s",
            bars: reads,
        });
    }
    let mut unary_methods: Vec<&str> = Vec::new();
    for (m, _, _) in &run.results {
        if m.latency.is_some()
            && m.method.starts_with("grpc-")
            && m.method != "grpc-health"
            && !unary_methods.contains(&m.method.as_str())
        {
            unary_methods.push(&m.method);
        }
    }
    let concurrencies = |method: &str| -> Vec<&Measurement> {
        run.results
            .iter()
            .filter(|(m, _, _)| m.method == method)
            .map(|(m, _, _)| m)
            .collect()
    };
    for grpc in unary_methods {
        let sql = crate::unary::sql_method(grpc).or(match grpc {
            "grpc-range" => Some("sqlx-range"),
            _ => None,
        });
        let mut bars = Vec::new();
        for m in concurrencies(grpc) {
            for method in [grpc, sql.unwrap_or(grpc), "grpc-health"] {
                if let Some((other, _, _)) = run
                    .results
                    .iter()
                    .find(|(o, _, _)| o.method == method && o.concurrency == m.concurrency)
                {
                    let entry = bar(other, color(method));
                    if !bars.iter().any(|b: &(String, f64, &str)| b.0 == entry.0) {
                        bars.push(entry);
                    }
                }
            }
        }
        panels.push(Panel {
            title: grpc.into(),
            unit: "calls/s",
            bars,
        });
    }
    svg(
        "krisp-ingest: throughput by concurrency (blue: the service; grey: direct SQL; green: the floor)",
        &panels,
        false,
    )
}

/// The live feeds' latency percentiles (median of the rounds), on a log scale.
pub(crate) fn latency_chart(run: &Run) -> String {
    let panels: Vec<Panel> = run
        .live
        .iter()
        .map(|(shape, rounds)| {
            let (title, color) = match shape.rpc {
                live::Rpc::Stream => (
                    format!("{} client streams: commit after the trailer", shape.feeds),
                    BLUE,
                ),
                live::Rpc::LiveFeed => (
                    format!("{} LiveFeeds: ack after each append", shape.feeds),
                    ORANGE,
                ),
            };
            Panel {
                title,
                unit: "ms, log scale",
                bars: live::latency_percentiles(rounds)
                    .into_iter()
                    .map(|(name, ms)| (name.to_owned(), ms, color))
                    .collect(),
            }
        })
        .collect();
    svg(
        "krisp-ingest: live feeds' latency percentiles",
        &panels,
        true,
    )
}
