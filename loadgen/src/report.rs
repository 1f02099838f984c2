//! Presenting a summary: the table printed at the end, the `--json` file,
//! and the `--report` plots (hand-written SVG: latency by percentile on a
//! log axis, then throughput, connections and per-second p99 over time),
//! optionally wrapped in an HTML page with the table.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::summary::{Percentiles, Summary};

/// The end-of-run table.
pub fn table(s: &Summary) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "loadgen {}", s.description);
    let _ = writeln!(o, "{:<13} {}", "urls", s.urls.join(" "));
    let c = &s.connections;
    let _ = writeln!(
        o,
        "{:<13} {} of {} up in {:.2} s ({:.0}/s), {} failed",
        "connections", c.established, c.planned, s.phases.connect_s, c.per_second, c.failed
    );
    if s.joins.planned > 0 {
        let j = &s.joins;
        let _ = writeln!(
            o,
            "{:<13} {} of {} joined in {:.2} s, {} failed, {} unanswered",
            "joins", j.joined, j.planned, s.phases.join_s, j.failed, j.timed_out
        );
    }
    if let Some(p) = &s.presence {
        let after = p.complete_after_s.map_or_else(|| "never".to_owned(), |t| format!("{t:.2} s in"));
        let _ = writeln!(
            o,
            "{:<13} {} frames ({} diffs, {} states), {:.1} per subscriber; {} of {} saw their whole room, the last {after}",
            "presence", p.frames, p.diffs, p.states, p.frames_per_subscriber, p.complete, p.subscribers
        );
    }
    if let Some(c) = &s.churn {
        let cpu = c.server_cpu_us_per_churn.map_or_else(String::new, |us| format!("; server {us:.0} us CPU per churn"));
        let _ = writeln!(
            o,
            "{:<13} {} leaves ({:.1}/s of {:.1} asked, {:.0} ms away), {} rejoined, {} unrecovered, {} refused, {} skipped",
            "churn",
            c.leaves,
            c.per_s,
            c.rate,
            c.away_s * 1e3,
            c.rejoins,
            c.unrecovered,
            c.failed,
            c.skipped
        );
        let _ = writeln!(
            o,
            "{:<13} {} presence frames meanwhile ({} diffs, {} states), {:.1} per subscriber{cpu}",
            "", c.presence_frames, c.presence_diffs, c.presence_states, c.presence_frames_per_subscriber
        );
    }
    let m = &s.messages;
    if m.sent > 0 || s.phases.send_s > 0.0 {
        let _ = writeln!(
            o,
            "{:<13} sent {} ({:.0}/s)  acked {}  delivered {} ({:.0}/s) of {} expected",
            "messages", m.sent, m.sent_per_s, m.acked, m.delivered, m.delivered_per_s, m.expected
        );
        let _ = writeln!(
            o,
            "{:<13} gaps {} ({} seqs)  duplicates {}  reorders {}  missing {}  extra {}  unacked {}  foreign {}",
            "correctness", m.gaps, m.gap_seqs, m.duplicates, m.reorders, m.missing, m.extra, m.unacked, m.foreign
        );
    }
    let _ = writeln!(
        o,
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    let rows: [(&str, &Percentiles); 4] = [
        ("delivery", &s.latency.delivery),
        ("delivery from send", &s.latency.delivery_from_send),
        ("ack", &s.latency.ack),
        ("connect", &s.latency.connect),
    ];
    for (name, p) in rows {
        if p.count == 0 {
            continue;
        }
        let ms = |us: f64| format!("{:.3}", us / 1000.0);
        let _ = writeln!(
            o,
            "  {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            p.count,
            ms(p.p50_us),
            ms(p.p90_us),
            ms(p.p99_us),
            ms(p.p999_us),
            ms(p.p9999_us),
            ms(p.max_us)
        );
    }
    if let Some(sv) = &s.server {
        let mut parts = Vec::new();
        if let (Some(cpu), Some(pct)) = (sv.cpu_s_send, sv.cpu_percent_send) {
            parts.push(format!("cpu {cpu:.2} s in the send phase ({pct:.0}% of a core)"));
        }
        if let Some(us) = sv.cpu_us_per_delivery {
            parts.push(format!("{us:.2} us cpu per delivered message"));
        }
        if let Some(us) = sv.cpu_us_per_connection {
            parts.push(format!("{us:.0} us cpu per connection"));
        }
        if let (Some(a), Some(b)) = (sv.rss_before_bytes, sv.rss_connected_bytes) {
            parts.push(format!("rss {} -> {}", bytes(a as f64), bytes(b as f64)));
        }
        if let Some(b) = sv.bytes_per_connection {
            parts.push(format!("{} per connection", bytes(b)));
        }
        let pids: Vec<String> = sv.pids.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(o, "{:<13} pid {}: {}", "server", pids.join(","), parts.join(", "));
    }
    let l = &s.loadgen;
    let phase = if s.phases.send_s > 0.0 { "send" } else { "hold" };
    let share = if s.phases.send_s.max(s.phases.hold_s) >= crate::engine::MIN_PHASE_FOR_PERCENT {
        format!("{:.0}% of a core, ", l.cpu_percent)
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "{:<13} cpu {:.2} s connecting, {:.2} s in the {phase} phase ({share}{} threads), rss {}",
        "loadgen",
        l.cpu_s_connect,
        l.cpu_s,
        l.threads,
        bytes(l.rss_bytes as f64)
    );
    let w = &s.wire;
    if w.bytes_in > 0 {
        let compression = match w.compression_offered {
            true => format!("compression on {} of {} connections", w.compressed_connections, c.established),
            false => "no compression offered".to_string(),
        };
        let _ = writeln!(
            o,
            "{:<13} in {} while measuring, {:.0} B per delivered message ({compression})",
            "wire",
            bytes(w.bytes_in as f64),
            w.bytes_in_per_delivery
        );
    }
    for p in &s.problems {
        let _ = writeln!(o, "{:<13} {p}", "PROBLEM");
    }
    for w in &s.warnings {
        let _ = writeln!(o, "{:<13} {w}", "warning");
    }
    let _ = writeln!(o, "{:<13} {}", "result", if s.ok { "ok" } else { "problems found" });
    o
}

fn bytes(b: f64) -> String {
    let a = b.abs();
    if a >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if a >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Write the summary as JSON.
pub fn write_json(s: &Summary, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(s)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Write the plots: SVG, or HTML (table + inline SVG) when the file name
/// ends in .html/.htm.
pub fn write_report(s: &Summary, path: &Path) -> Result<()> {
    write_svg_or_html(path, &format!("loadgen {}", s.scenario), &table(s), &svg(s))
}

/// Writes `svg` to `path`, or, when the file name ends in .html/.htm, an
/// HTML page with `heading`, the text `table` and the SVG inline.
pub(crate) fn write_svg_or_html(path: &Path, heading: &str, table: &str, svg: &str) -> Result<()> {
    let is_html = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"));
    let text = if is_html {
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{heading}</title>\
             <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f6f6f6;padding:1em}}</style>\
             </head><body><h1>{heading}</h1><pre>{}</pre>\n{svg}\n</body></html>\n",
            esc(table),
            heading = esc(heading),
        )
    } else {
        svg.to_owned()
    };
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) const W: f64 = 960.0;
pub(crate) const PANEL_H: f64 = 300.0;
pub(crate) const MARGIN_L: f64 = 80.0;
const MARGIN_R: f64 = 180.0;
const MARGIN_T: f64 = 40.0;
const MARGIN_B: f64 = 45.0;

#[derive(Clone, Copy)]
pub(crate) enum Scale {
    Linear,
    Log,
}

pub(crate) struct Axis {
    pub(crate) label: String,
    pub(crate) scale: Scale,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) ticks: Vec<(f64, String)>,
}

impl Axis {
    fn frac(&self, v: f64) -> f64 {
        let f = match self.scale {
            Scale::Linear => (v - self.min) / (self.max - self.min),
            Scale::Log => (v.max(1e-12).log10() - self.min.log10()) / (self.max.log10() - self.min.log10()),
        };
        if f.is_finite() {
            f.clamp(-0.05, 1.05)
        } else {
            0.0
        }
    }
}

pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) color: &'static str,
    pub(crate) dashed: bool,
    pub(crate) points: Vec<(f64, f64)>,
}

/// The whole report as one SVG document.
pub fn svg(s: &Summary) -> String {
    let mut panels = Vec::new();
    panels.push(latency_panel(s));
    let tl = &s.timeline;
    let t = |f: &dyn Fn(&crate::summary::Tick) -> Option<f64>| -> Vec<(f64, f64)> {
        tl.iter().filter_map(|k| f(k).map(|v| (k.t_s, v))).collect()
    };
    if tl.iter().any(|k| k.delivered_per_s > 0.0) {
        panels.push(time_panel(
            s,
            "Deliveries per second",
            "messages/s",
            vec![Series {
                name: "delivered".into(),
                color: "#1f77b4",
                dashed: false,
                points: t(&|k| Some(k.delivered_per_s)),
            }],
        ));
    }
    if tl.iter().any(|k| k.sent_per_s > 0.0) {
        panels.push(time_panel(
            s,
            "Sends and acks per second",
            "messages/s",
            vec![
                Series { name: "sent".into(), color: "#2ca02c", dashed: false, points: t(&|k| Some(k.sent_per_s)) },
                Series { name: "acked".into(), color: "#ff7f0e", dashed: true, points: t(&|k| Some(k.acked_per_s)) },
            ],
        ));
        panels.push(time_panel(
            s,
            "p99 latency of each second",
            "ms",
            vec![
                Series {
                    name: "delivery p99".into(),
                    color: "#1f77b4",
                    dashed: false,
                    points: t(&|k| k.p99_delivery_ms),
                },
                Series { name: "ack p99".into(), color: "#ff7f0e", dashed: true, points: t(&|k| k.p99_ack_ms) },
            ],
        ));
    }
    panels.push(time_panel(
        s,
        "Open connections",
        "connections",
        vec![Series {
            name: "open".into(),
            color: "#9467bd",
            dashed: false,
            points: t(&|k| Some(k.connections as f64)),
        }],
    ));
    let header_h = 50.0;
    let total_h = header_h + PANEL_H * panels.len() as f64;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{total_h}\" \
         viewBox=\"0 0 {W} {total_h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{MARGIN_L}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">loadgen {}</text>\n\
         <text x=\"{MARGIN_L}\" y=\"40\" fill=\"#555\">{}</text>\n",
        esc(&s.scenario),
        esc(&s.description)
    );
    for (i, p) in panels.iter().enumerate() {
        let _ = writeln!(o, "<g transform=\"translate(0,{})\">{p}</g>", header_h + PANEL_H * i as f64);
    }
    o.push_str("</svg>\n");
    o
}

fn latency_panel(s: &Summary) -> String {
    let c = &s.curves;
    let mk = |name: &str, color: &'static str, dashed: bool, pts: &[[f64; 2]]| Series {
        name: name.into(),
        color,
        dashed,
        points: percentile_points(pts),
    };
    let series: Vec<Series> = [
        mk("delivery", "#1f77b4", false, &c.delivery),
        mk("delivery from send", "#17becf", true, &c.delivery_from_send),
        mk("ack", "#ff7f0e", false, &c.ack),
        mk("connect", "#2ca02c", false, &c.connect),
    ]
    .into_iter()
    .filter(|s| !s.points.is_empty())
    .collect();
    chart("Latency by percentile", &percentile_axis(), &log_latency_axis(&series), &series, None)
}

/// A latency curve (`[percentile, µs]`) as chart points: x spreads the
/// tail (90% -> 1, 99% -> 2, ...), y in milliseconds.
pub(crate) fn percentile_points(pts: &[[f64; 2]]) -> Vec<(f64, f64)> {
    pts.iter().filter(|p| p[0] < 100.0).map(|p| (-(1.0 - p[0] / 100.0).log10(), p[1] / 1000.0)).collect()
}

/// The x axis of [`percentile_points`]: 0% to 99.999%.
pub(crate) fn percentile_axis() -> Axis {
    Axis {
        label: "percentile".into(),
        scale: Scale::Linear,
        min: 0.0,
        max: 5.0,
        ticks: ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
            .iter()
            .enumerate()
            .map(|(i, l)| (i as f64, l.to_string()))
            .collect(),
    }
}

/// A log-scale latency axis (ms) spanning every decade the series reach.
pub(crate) fn log_latency_axis(series: &[Series]) -> Axis {
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if hi > 0.0 { (lo, hi) } else { (0.001, 1.0) };
    let dmin = lo.log10().floor() as i32;
    let dmax = (hi.log10().ceil() as i32).max(dmin + 1);
    Axis {
        label: "latency (ms, log)".into(),
        scale: Scale::Log,
        min: 10f64.powi(dmin),
        max: 10f64.powi(dmax),
        ticks: (dmin..=dmax).map(|d| (10f64.powi(d), num(10f64.powi(d)))).collect(),
    }
}

fn time_panel(s: &Summary, title: &str, ylabel: &str, series: Vec<Series>) -> String {
    let tmax = s.timeline.last().map(|t| t.t_s).unwrap_or(1.0).max(1.0);
    let vmax = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
    let x = Axis {
        label: "time (s)".into(),
        scale: Scale::Linear,
        min: 0.0,
        max: tmax,
        ticks: nice_ticks(tmax).into_iter().map(|v| (v, num(v))).collect(),
    };
    let ymax = if vmax > 0.0 { vmax * 1.1 } else { 1.0 };
    let y = Axis {
        label: ylabel.into(),
        scale: Scale::Linear,
        min: 0.0,
        max: ymax,
        ticks: nice_ticks(ymax).into_iter().map(|v| (v, num(v))).collect(),
    };
    let p = &s.phases;
    let send = (p.send_s > 0.0).then_some((p.measure_at_s, p.measure_at_s + p.send_s));
    chart(title, &x, &y, &series, send)
}

/// One panel: axes, grid, lines, legend; `band` shades an x range (the
/// send phase).
pub(crate) fn chart(title: &str, x: &Axis, y: &Axis, series: &[Series], band: Option<(f64, f64)>) -> String {
    let pw = W - MARGIN_L - MARGIN_R;
    let ph = PANEL_H - MARGIN_T - MARGIN_B;
    let px = |v: f64| MARGIN_L + x.frac(v) * pw;
    let py = |v: f64| MARGIN_T + (1.0 - y.frac(v)) * ph;
    let mut o = String::new();
    let _ = write!(
        o,
        "<text x=\"{MARGIN_L}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        MARGIN_T - 12.0,
        esc(title)
    );
    if let Some((a, b)) = band {
        let (xa, xb) = (px(a.max(x.min)), px(b.min(x.max)));
        let _ = write!(
            o,
            "<rect x=\"{xa:.1}\" y=\"{MARGIN_T}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#fff4d6\"/>\
             <text x=\"{:.1}\" y=\"{}\" fill=\"#b08000\" font-size=\"10\">send phase</text>",
            (xb - xa).max(0.0),
            xa + 3.0,
            MARGIN_T + 12.0
        );
    }
    for (v, l) in &x.ticks {
        let xv = px(*v);
        let _ = write!(
            o,
            "<line x1=\"{xv:.1}\" y1=\"{MARGIN_T}\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            MARGIN_T + ph,
            MARGIN_T + ph + 16.0,
            esc(l)
        );
    }
    for (v, l) in &y.ticks {
        let yv = py(*v);
        let _ = write!(
            o,
            "<line x1=\"{MARGIN_L}\" y1=\"{yv:.1}\" x2=\"{:.1}\" y2=\"{yv:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            MARGIN_L + pw,
            MARGIN_L - 6.0,
            yv + 4.0,
            esc(l)
        );
    }
    let _ = write!(
        o,
        "<rect x=\"{MARGIN_L}\" y=\"{MARGIN_T}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text transform=\"translate({:.1},{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        MARGIN_L + pw / 2.0,
        MARGIN_T + ph + 34.0,
        esc(&x.label),
        MARGIN_L - 58.0,
        MARGIN_T + ph / 2.0,
        esc(&y.label)
    );
    for (i, s) in series.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let pts: Vec<String> = s.points.iter().map(|(a, b)| format!("{:.1},{:.1}", px(*a), py(*b))).collect();
        let dash = if s.dashed { " stroke-dasharray=\"6,4\"" } else { "" };
        let _ = write!(
            o,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            s.color,
            pts.join(" ")
        );
        let ly = MARGIN_T + 10.0 + 18.0 * i as f64;
        let lx = MARGIN_L + pw + 12.0;
        let _ = write!(
            o,
            "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            lx + 22.0,
            s.color,
            lx + 28.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    o
}

/// Round tick values from 0 to about `max`.
pub(crate) fn nice_ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0];
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| max / s <= 6.0).unwrap_or(mag * 10.0);
    let mut v = Vec::new();
    let mut t = 0.0;
    while t <= max * 1.0001 {
        v.push(t);
        t += step;
    }
    v
}

/// A short number: 1.5k, 2M, 0.01.
pub(crate) fn num(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e3 {
        format!("{}k", trim(format!("{:.2}", v / 1e3)))
    } else if a >= 1.0 || a == 0.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.4}"))
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::{Summary, Tick};

    #[test]
    fn ticks_and_numbers() {
        assert_eq!(nice_ticks(10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(num(1500.0), "1.5k");
        assert_eq!(num(0.01), "0.01");
        assert_eq!(num(2_000_000.0), "2M");
    }

    #[test]
    fn renders_an_empty_and_a_full_summary() {
        let mut s = Summary::default();
        assert!(svg(&s).starts_with("<svg"));
        s.phases.send_s = 3.0;
        s.phases.measure_at_s = 1.0;
        s.curves.delivery = vec![[0.0, 100.0], [90.0, 200.0], [99.0, 900.0], [100.0, 5000.0]];
        s.timeline = (0..5)
            .map(|i| Tick {
                t_s: i as f64,
                phase: if i > 1 { "send".into() } else { "connect".into() },
                sent_per_s: 100.0,
                delivered_per_s: 1000.0,
                ..Default::default()
            })
            .collect();
        let out = svg(&s);
        assert!(out.contains("polyline"));
        assert!(out.contains("99.99%"));
        assert!(!out.contains("NaN"));
        assert!(table(&s).contains("result"));
    }
}
