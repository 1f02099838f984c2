//! Presenting a sweep: one table row per step with the capacity named, the
//! `--json` file (every step), and the plot of latency percentiles and
//! server CPU against achieved throughput, as SVG or as HTML with the
//! table, drawn with the same chart code as a single run's report.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::report::{
    chart, esc, log_latency_axis, nice_ticks, num, write_svg_or_html, Axis, Scale, Series, MARGIN_L, PANEL_H, W,
};
use crate::sweep::SweepSummary;

/// The end-of-sweep table.
pub fn table(s: &SweepSummary) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "loadgen sweep of {}", s.description);
    let _ = writeln!(o, "urls          {}", s.urls.join(" "));
    let _ = writeln!(
        o,
        "connections   {} of {} up, {} of {} joins",
        s.connections.established, s.connections.planned, s.joins.joined, s.joins.planned
    );
    let _ = writeln!(
        o,
        "{:>4} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}  verdict",
        "step",
        s.stepped,
        "offered/s",
        "sent/s",
        "delivered/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "srv cpu",
        "lg cpu"
    );
    for (i, st) in s.steps.iter().enumerate() {
        let lat = if st.delivery.count > 0 { &st.delivery } else { &st.ack };
        let cpu = st.server_cpu_percent.map(|c| format!("{c:.0}%")).unwrap_or_else(|| "-".into());
        let verdict = if st.met { "ok".to_string() } else { st.broke.join("; ") };
        let _ = writeln!(
            o,
            "{:>4} {:>10} {:>10.0} {:>10.0} {:>12.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>7} {:>6.0}%  {}",
            i + 1,
            num(st.rate),
            st.offered_per_s,
            st.sent_per_s,
            st.delivered_per_s,
            lat.p50_us,
            lat.p99_us,
            lat.p999_us,
            lat.max_us,
            cpu,
            st.loadgen_cpu_percent,
            verdict
        );
    }
    match &s.capacity {
        Some(c) => {
            let _ = writeln!(
                o,
                "capacity      step {}: {} {} ({:.0} sent/s, {:.0} delivered/s)",
                c.step + 1,
                s.stepped,
                num(c.rate),
                c.sent_per_s,
                c.delivered_per_s
            );
        }
        None => {
            let _ = writeln!(o, "capacity      none: the first step already broke a condition");
        }
    }
    let _ = writeln!(o, "stopped       {}", s.stopped);
    for w in &s.warnings {
        let _ = writeln!(o, "warning       {w}");
    }
    o
}

/// Write the sweep as JSON.
pub fn write_json(s: &SweepSummary, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(s)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Write the plot: SVG, or HTML (table + inline SVG) when the file name
/// ends in .html/.htm.
pub fn write_report(s: &SweepSummary, path: &Path) -> Result<()> {
    write_svg_or_html(path, &format!("loadgen sweep of {}", s.target), &table(s), &svg(s))
}

/// Latency percentiles (log ms) and server CPU against achieved throughput.
pub fn svg(s: &SweepSummary) -> String {
    let xmax = s.steps.iter().map(|st| st.throughput()).fold(0.0f64, f64::max);
    let xmax = if xmax > 0.0 { xmax * 1.05 } else { 1.0 };
    let x = Axis {
        label: "achieved throughput (messages/s)".into(),
        scale: Scale::Linear,
        min: 0.0,
        max: xmax,
        ticks: nice_ticks(xmax).into_iter().map(|v| (v, num(v))).collect(),
    };
    let pick = |f: &dyn Fn(&crate::summary::Percentiles) -> f64| -> Vec<(f64, f64)> {
        s.steps
            .iter()
            .map(|st| {
                let p = if st.delivery.count > 0 { &st.delivery } else { &st.ack };
                (st.throughput(), f(p) / 1000.0)
            })
            .collect()
    };
    let series = vec![
        Series { name: "p50".into(), color: "#2ca02c", dashed: false, points: pick(&|p| p.p50_us) },
        Series { name: "p99".into(), color: "#1f77b4", dashed: false, points: pick(&|p| p.p99_us) },
        Series { name: "p99.9".into(), color: "#ff7f0e", dashed: false, points: pick(&|p| p.p999_us) },
        Series { name: "max".into(), color: "#d62728", dashed: true, points: pick(&|p| p.max_us) },
    ];
    let y = log_latency_axis(&series);
    // The capacity's throughput is shaded as a thin band.
    let band = s.capacity.as_ref().and_then(|c| s.steps.get(c.step)).map(|st| {
        let t = st.throughput();
        (t - xmax * 0.005, t + xmax * 0.005)
    });
    let mut panels = vec![chart("Latency against throughput (band: capacity)", &x, &y, &series, band)];
    let cpu: Vec<(f64, f64)> =
        s.steps.iter().filter_map(|st| st.server_cpu_percent.map(|c| (st.throughput(), c))).collect();
    if !cpu.is_empty() {
        let cmax = cpu.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.1;
        let y = Axis {
            label: "server CPU (% of one core)".into(),
            scale: Scale::Linear,
            min: 0.0,
            max: cmax,
            ticks: nice_ticks(cmax).into_iter().map(|v| (v, num(v))).collect(),
        };
        let series = [Series { name: "server CPU".into(), color: "#9467bd", dashed: false, points: cpu }];
        panels.push(chart("Server CPU against throughput", &x, &y, &series, band));
    }
    let header_h = 50.0;
    let total_h = header_h + PANEL_H * panels.len() as f64;
    let cap = match &s.capacity {
        Some(c) => format!("capacity: {} {} ({:.0} delivered/s)", s.stepped, num(c.rate), c.delivered_per_s),
        None => "no step met the conditions".into(),
    };
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{total_h}\" \
         viewBox=\"0 0 {W} {total_h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{MARGIN_L}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">loadgen sweep of {}: {}</text>\n\
         <text x=\"{MARGIN_L}\" y=\"40\" fill=\"#555\">{}</text>\n",
        esc(&s.target),
        esc(&cap),
        esc(&s.description)
    );
    for (i, p) in panels.iter().enumerate() {
        let _ = writeln!(o, "<g transform=\"translate(0,{})\">{p}</g>", header_h + PANEL_H * i as f64);
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{Capacity, Step};

    #[test]
    fn renders_steps_and_capacity() {
        let mut s = SweepSummary { target: "fanout".into(), stepped: "rate".into(), ..Default::default() };
        for (i, r) in [100.0, 200.0, 400.0].into_iter().enumerate() {
            let mut st = Step { rate: r, delivered: 10, delivered_per_s: r * 10.0, met: i < 2, ..Default::default() };
            st.delivery.count = 10;
            st.delivery.p99_us = 100.0 * (i as f64 + 1.0);
            st.server_cpu_percent = Some(10.0 * (i as f64 + 1.0));
            if i == 2 {
                st.broke.push("p99 300 us above 250 us".into());
            }
            s.steps.push(st);
        }
        s.capacity = Some(Capacity { step: 1, rate: 200.0, sent_per_s: 200.0, delivered_per_s: 2000.0 });
        let t = table(&s);
        assert!(t.contains("capacity      step 2: rate 200"), "{t}");
        assert!(t.contains("p99 300 us above 250 us"), "{t}");
        let svg = svg(&s);
        assert!(svg.starts_with("<svg") && svg.contains("Server CPU against throughput"));
        assert!(svg.contains("capacity: rate 200"));
        assert!(!svg.contains("NaN"));
        let empty = svg_of_empty();
        assert!(!empty.contains("NaN"));
    }

    fn svg_of_empty() -> String {
        svg(&SweepSummary::default())
    }
}
