//! `loadgen compare`: did a change help? Runs side by side: one table of
//! every figure with each run's ratio to the first, as JSON too, and the
//! delivery (and ack) latency curves of all runs overlaid on one plot.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::report::{
    chart, esc, log_latency_axis, percentile_axis, percentile_points, write_svg_or_html, Series, MARGIN_L, PANEL_H, W,
};
use crate::summary::Summary;

/// One figure of every run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    pub figure: String,
    /// Per run, in order; None when a run does not have the figure.
    pub values: Vec<Option<f64>>,
    /// Per run, value / the first run's value (None when either is missing
    /// or the first is 0).
    pub ratios: Vec<Option<f64>>,
}

/// The comparison.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Comparison {
    /// The runs' names (their files) and descriptions.
    pub runs: Vec<String>,
    pub descriptions: Vec<String>,
    pub rows: Vec<Row>,
}

type Figure = (&'static str, fn(&Summary) -> Option<f64>);

/// The figures compared, in table order.
const FIGURES: &[Figure] = &[
    ("sent/s", |s| Some(s.messages.sent_per_s)),
    ("delivered/s", |s| Some(s.messages.delivered_per_s)),
    ("delivered", |s| Some(s.messages.delivered as f64)),
    ("missing", |s| Some(s.messages.missing as f64)),
    ("gaps", |s| Some(s.messages.gaps as f64)),
    ("delivery p50 us", |s| pct(s.latency.delivery.count, s.latency.delivery.p50_us)),
    ("delivery p90 us", |s| pct(s.latency.delivery.count, s.latency.delivery.p90_us)),
    ("delivery p99 us", |s| pct(s.latency.delivery.count, s.latency.delivery.p99_us)),
    ("delivery p99.9 us", |s| pct(s.latency.delivery.count, s.latency.delivery.p999_us)),
    ("delivery max us", |s| pct(s.latency.delivery.count, s.latency.delivery.max_us)),
    ("ack p50 us", |s| pct(s.latency.ack.count, s.latency.ack.p50_us)),
    ("ack p99 us", |s| pct(s.latency.ack.count, s.latency.ack.p99_us)),
    ("connect p50 us", |s| pct(s.latency.connect.count, s.latency.connect.p50_us)),
    ("connect p99 us", |s| pct(s.latency.connect.count, s.latency.connect.p99_us)),
    ("connections/s", |s| Some(s.connections.per_second)),
    ("server CPU us/delivery", |s| s.server.as_ref().and_then(|v| v.cpu_us_per_delivery)),
    ("server CPU % (send)", |s| s.server.as_ref().and_then(|v| v.cpu_percent_send)),
    ("server bytes/connection", |s| s.server.as_ref().and_then(|v| v.bytes_per_connection)),
    ("loadgen CPU %", |s| Some(s.loadgen.cpu_percent)),
];

fn pct(count: u64, v: f64) -> Option<f64> {
    (count > 0).then_some(v)
}

/// Compare `runs` (name, summary); ratios are to the first.
pub fn compare(runs: &[(String, Summary)]) -> Comparison {
    let rows = FIGURES
        .iter()
        .map(|(name, f)| {
            let values: Vec<Option<f64>> = runs.iter().map(|(_, s)| f(s)).collect();
            let base = values.first().copied().flatten();
            let ratios = values
                .iter()
                .map(|v| match (base, v) {
                    (Some(b), Some(v)) if b != 0.0 => Some(v / b),
                    _ => None,
                })
                .collect();
            Row { figure: name.to_string(), values, ratios }
        })
        .collect();
    Comparison {
        runs: runs.iter().map(|(n, _)| n.clone()).collect(),
        descriptions: runs.iter().map(|(_, s)| s.description.clone()).collect(),
        rows,
    }
}

/// The table: a column per run, "value (x ratio)" after the first.
pub fn table(c: &Comparison) -> String {
    let mut o = String::new();
    for (i, (n, d)) in c.runs.iter().zip(&c.descriptions).enumerate() {
        let _ = writeln!(o, "run {}: {n}: {d}", i + 1);
    }
    let _ = write!(o, "{:<24}", "figure");
    for i in 0..c.runs.len() {
        let _ = write!(o, " {:>22}", format!("run {}", i + 1));
    }
    o.push('\n');
    for r in &c.rows {
        let _ = write!(o, "{:<24}", r.figure);
        for (i, (v, ratio)) in r.values.iter().zip(&r.ratios).enumerate() {
            let cell = match (v, ratio) {
                (None, _) => "-".to_string(),
                (Some(v), _) if i == 0 => fmt(*v),
                (Some(v), Some(x)) => format!("{} (x{x:.2})", fmt(*v)),
                (Some(v), None) => fmt(*v),
            };
            let _ = write!(o, " {cell:>22}");
        }
        o.push('\n');
    }
    o
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Write the comparison as JSON.
pub fn write_json(c: &Comparison, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(c)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

/// The runs' delivery latency curves (ack, dashed, for runs without
/// deliveries) overlaid, percentile on the usual log(1/(1-p)) axis.
pub fn svg(c: &Comparison, runs: &[(String, Summary)]) -> String {
    let series: Vec<Series> = runs
        .iter()
        .enumerate()
        .map(|(i, (_, s))| {
            let (pts, what, dashed) = if s.curves.delivery.is_empty() {
                (&s.curves.ack, "ack", true)
            } else {
                (&s.curves.delivery, "delivery", false)
            };
            Series {
                name: format!("run {} {what}", i + 1),
                color: COLORS[i % COLORS.len()],
                dashed,
                points: percentile_points(pts),
            }
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    let panel =
        chart("Latency by percentile, runs overlaid", &percentile_axis(), &log_latency_axis(&series), &series, None);
    let total_h = 50.0 + PANEL_H;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{total_h}\" \
         viewBox=\"0 0 {W} {total_h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{MARGIN_L}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">loadgen compare: {}</text>\n",
        esc(&c.runs.join(" vs "))
    );
    let _ = writeln!(o, "<g transform=\"translate(0,50)\">{panel}</g>");
    o.push_str("</svg>\n");
    o
}

/// Write the plot: SVG, or HTML with the table when the name ends in .html.
pub fn write_report(c: &Comparison, runs: &[(String, Summary)], path: &Path) -> Result<()> {
    write_svg_or_html(path, "loadgen compare", &table(c), &svg(c, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(delivered_per_s: f64, p99: f64) -> Summary {
        let mut s = Summary::default();
        s.messages.delivered_per_s = delivered_per_s;
        s.latency.delivery.count = 100;
        s.latency.delivery.p99_us = p99;
        s.curves.delivery = vec![[0.0, p99 / 2.0], [99.0, p99], [100.0, p99 * 2.0]];
        s
    }

    #[test]
    fn ratios_are_to_the_first_run() {
        let runs = vec![("a".to_string(), run(1000.0, 200.0)), ("b".to_string(), run(1500.0, 100.0))];
        let c = compare(&runs);
        let row = |n: &str| c.rows.iter().find(|r| r.figure == n).unwrap().clone();
        assert_eq!(row("delivered/s").ratios, vec![Some(1.0), Some(1.5)]);
        assert_eq!(row("delivery p99 us").ratios, vec![Some(1.0), Some(0.5)]);
        // No server figures: no value, no ratio.
        assert_eq!(row("server CPU us/delivery").values, vec![None, None]);
        let t = table(&c);
        assert!(t.contains("1500 (x1.50)"), "{t}");
        assert!(t.contains("100 (x0.50)"), "{t}");
        let svg = svg(&c, &runs);
        assert!(svg.contains("run 1 delivery") && svg.contains("run 2 delivery"));
        assert!(!svg.contains("NaN"));
    }
}
