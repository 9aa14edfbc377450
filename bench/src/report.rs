//! The report: the median round of each measurement, the ratios, the chart.

use std::fmt::Write as _;

use crate::fixtures::Measurement;

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

pub(crate) fn chart(results: &[Measurement]) -> String {
    let bars: Vec<(String, f64)> = results
        .iter()
        .map(|m| {
            (
                format!("{} x{}", m.method, m.concurrency),
                m.rows_per_second(),
            )
        })
        .collect();
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let (row_height, left, width) = (26.0, 170.0, 460.0);
    let height = row_height * bars.len() as f64 + 50.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">krisp-ingest: sentiment rows/s by method and concurrency</text>\n"
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 32.0 + i as f64 * row_height;
        let w = value / max * width;
        let color = if label.starts_with("copy") {
            "#888"
        } else if label.starts_with("grpc") {
            "#2a7ae2"
        } else {
            "#e2a72a"
        };
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text>\
             <rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"18\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{}\">{value:.0}</text>",
            left - 6.0,
            y + 13.0,
            left + w + 4.0,
            y + 13.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}
