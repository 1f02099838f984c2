//! `loadgen sweep`: how much can the server take? One set of connections
//! is opened and joined once; then the send rate is stepped (by a factor or
//! an increment), one short send phase per step, each followed by its drain,
//! until a step breaks a stop condition (p99 above a limit, any seq gap or
//! missing delivery, any error frame or unexpected close, server CPU at a
//! ceiling) or the last step. The capacity is the last step that met every
//! condition. Keeping the connections between steps means a step measures
//! the rate alone, not a fresh connect storm.
//!
//! The plan is built once at the first step's rate; a step at k times that
//! rate scales every schedule by 1/k ([`Shared::set_schedule_scale`]), and
//! the figures of the previous step are reset ([`Stats::reset_step`]) while
//! the seq tracks of every member carry on, so a gap between two steps is
//! still seen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cli::{Cli, Scenario, SweepArgs};
use crate::client::{Connector, Target};
use crate::clock::Clock;
use crate::engine;
use crate::interrupt::Interrupt;
use crate::limits;
use crate::pacer;
use crate::proc::{self, ServerProcs};
use crate::progress::{Phase, PhaseCell, Progress};
use crate::scenario;
use crate::session::Shared;
use crate::stats::Stats;
use crate::summary::{Connections, Event, Joins, Percentiles};
use crate::token::TokenSource;

/// A whole sweep: every step, and the capacity.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SweepSummary {
    /// Always "sweep".
    pub scenario: String,
    /// The scenario stepped: fanout or chat.
    pub target: String,
    /// The scenario at the first step's rate.
    pub description: String,
    /// The options of the run (the JWT secret left out).
    pub params: serde_json::Value,
    pub urls: Vec<String>,
    pub started_unix: u64,
    /// What is stepped: "rate" (fanout, messages/s in total) or
    /// "rate_per_user" (chat, messages/s per member).
    pub stepped: String,
    pub connections: Connections,
    pub joins: Joins,
    pub steps: Vec<Step>,
    /// The last step that met every stop condition, if any did.
    pub capacity: Option<Capacity>,
    /// Why the sweep ended, in words.
    pub stopped: String,
    pub warnings: Vec<String>,
}

/// The capacity a sweep found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// Index into `steps`.
    pub step: usize,
    /// The stepped value (see `SweepSummary::stepped`).
    pub rate: f64,
    /// Messages sent and delivered per second at that step.
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
}

/// One step's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Step {
    /// The stepped value (see `SweepSummary::stepped`).
    pub rate: f64,
    /// Messages per second all senders together were scheduled to send.
    pub offered_per_s: f64,
    pub send_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub sent_per_s: f64,
    pub acked_per_s: f64,
    pub delivered: u64,
    pub expected: u64,
    pub missing: u64,
    pub delivered_per_s: f64,
    pub gaps: u64,
    pub duplicates: u64,
    pub reorders: u64,
    /// Error frames and unexpected closes during the step.
    pub events: Vec<Event>,
    pub delivery: Percentiles,
    pub ack: Percentiles,
    /// Server CPU over the send phase, percent of one core (--server-pid).
    pub server_cpu_percent: Option<f64>,
    /// loadgen's own CPU over the send phase, percent of one core.
    pub loadgen_cpu_percent: f64,
    /// True when the step met every stop condition.
    pub met: bool,
    /// The conditions it broke, in words.
    pub broke: Vec<String>,
}

impl Step {
    /// Achieved throughput, the x axis of the curve: deliveries per second,
    /// or acks per second when nothing is delivered.
    pub fn throughput(&self) -> f64 {
        if self.delivered > 0 {
            self.delivered_per_s
        } else {
            self.acked_per_s
        }
    }

    /// The latency the p99 limit applies to.
    pub fn p99_us(&self) -> f64 {
        if self.delivery.count > 0 {
            self.delivery.p99_us
        } else {
            self.ack.p99_us
        }
    }
}

/// The stop conditions of a sweep.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub max_p99: Option<Duration>,
    pub max_server_cpu: Option<f64>,
    pub allow_loss: bool,
    pub allow_errors: bool,
}

impl Limits {
    pub fn from_args(a: &SweepArgs) -> Self {
        Self {
            max_p99: a.max_p99,
            max_server_cpu: a.max_server_cpu,
            allow_loss: a.allow_loss,
            allow_errors: a.allow_errors,
        }
    }

    /// The conditions `s` broke, in words (empty: it met them all).
    pub fn broken(&self, s: &Step) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(max) = self.max_p99 {
            let limit_us = max.as_secs_f64() * 1e6;
            if s.p99_us() > limit_us {
                out.push(format!("p99 {:.0} us above {:.0} us", s.p99_us(), limit_us));
            }
        }
        if !self.allow_loss {
            let lost = s.gaps + s.duplicates + s.reorders + s.missing;
            if lost > 0 {
                out.push(format!(
                    "loss: {} gaps, {} duplicates, {} reorders, {} missing deliveries",
                    s.gaps, s.duplicates, s.reorders, s.missing
                ));
            }
            if s.acked < s.sent {
                out.push(format!("{} of {} sends never acked", s.sent - s.acked, s.sent));
            }
        }
        if !self.allow_errors {
            for e in &s.events {
                out.push(format!("{} {} {}: {}", e.count, e.kind, e.key, e.sample));
            }
        }
        if let (Some(max), Some(cpu)) = (self.max_server_cpu, s.server_cpu_percent) {
            if cpu >= max {
                out.push(format!("server CPU {cpu:.0}% at the {max:.0}% ceiling"));
            }
        }
        out
    }
}

/// The stepped values: `start`, then times `factor` (or plus `step`), at
/// most `steps` of them, none above `max`.
pub fn rates(start: f64, factor: f64, step: Option<f64>, steps: usize, max: Option<f64>) -> Vec<f64> {
    let mut out = Vec::new();
    let mut r = start;
    while out.len() < steps && max.is_none_or(|m| r <= m * (1.0 + 1e-9)) && r.is_finite() && r > 0.0 {
        out.push(r);
        r = match step {
            Some(s) => r + s,
            None => r * factor,
        };
    }
    out
}

/// The capacity: the last step before the first one that broke a
/// condition (every step when none did).
pub fn capacity(steps: &[Step]) -> Option<Capacity> {
    let end = steps.iter().position(|s| !s.met).unwrap_or(steps.len());
    let i = end.checked_sub(1)?;
    let s = &steps[i];
    Some(Capacity { step: i, rate: s.rate, sent_per_s: s.sent_per_s, delivered_per_s: s.delivered_per_s })
}

/// Run the sweep described by `cli` (whose scenario must be `sweep`).
pub async fn run(cli: Cli) -> Result<SweepSummary> {
    let Scenario::Sweep(args) = &cli.scenario else {
        bail!("not a sweep");
    };
    let common = &cli.common;
    if !(args.factor > 1.0 && args.factor.is_finite()) && args.step.is_none() {
        bail!("--factor must be above 1 (or give --step)");
    }
    if args.step.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
        bail!("--step must be above 0");
    }
    let start_rate = args.target.start_rate();
    let rates = rates(start_rate, args.factor, args.step, args.steps, args.max_rate);
    if rates.is_empty() {
        bail!("no step to run: check --steps and --max-rate against the scenario's rate");
    }
    let limits_ = Limits::from_args(args);
    let phase_args = args.target.phase().clone();
    let inner = args.target.scenario();
    let clock = Clock::new();
    let started_unix = clock.unix_secs();
    if common.churn.is_some() {
        bail!("--churn is for a single run, not a sweep");
    }
    let plan = scenario::plan(&inner)?.split(common.id, common.of)?;
    if common.urls.is_empty() {
        bail!("no --url given");
    }
    limits::check_fd_budget(plan.specs.len())?;
    let server = ServerProcs::new(&common.server_pids)?;
    let per_step = phase_args.duration + phase_args.drain;
    let lifetime = per_step.as_secs() * rates.len() as u64
        + common.join_timeout.as_secs()
        + common.connect_rate.filter(|r| *r > 0.0).map(|r| plan.specs.len() as f64 / r).unwrap_or(0.0) as u64
        + 600;
    let tokens = Arc::new(TokenSource::new(
        common.jwt_secret.as_deref(),
        common.token_file.as_deref(),
        &common.sub_prefix,
        started_unix,
        lifetime,
    )?);
    let mut targets = Vec::new();
    for url in &common.urls {
        targets.push(Target::resolve(url).await?);
    }
    let connector = Arc::new(Connector::new(targets, common.source_ips, common.connect_timeout));
    let stats = Stats::new(plan.rooms.len(), common.threads.max(1) * 4)?;
    let sh = Arc::new(Shared::new(stats, clock, plan.rooms.clone()));
    let phase = PhaseCell::default();
    // Messages per second all senders send at the first step.
    let base_offered: f64 =
        plan.specs.iter().filter_map(|s| s.send.as_ref()).map(|s| 1e9 / s.schedule.interval_ns).sum();
    let mut warnings = Vec::new();
    if !common.quiet {
        eprintln!("loadgen sweep of {}", plan.description);
        eprintln!("loadgen sweep steps: {}", rates.iter().map(|r| format!("{r}")).collect::<Vec<_>>().join(", "));
    }
    let intr = Interrupt::install();
    let progress = Progress::start(sh.clone(), phase.clone(), plan.specs.len(), common.quiet);
    let t0 = Instant::now();

    phase.set(Phase::Connect);
    let sessions = engine::connect_all(&plan, &connector, &tokens, &sh, common, &intr).await;
    let connect_s = t0.elapsed().as_secs_f64();
    if intr.is_set() || sessions.is_empty() {
        engine::close_all(&sh, sessions).await;
        let _ = progress.finish().await;
        if intr.is_set() {
            bail!("interrupted while connecting");
        }
        bail!("could not connect: {}", engine::failure_words(&sh, &plan, "connect"));
    }
    phase.set(Phase::Join);
    let timed_out = engine::wait_joins(&sh, common.join_timeout, &intr).await;
    if plan.joins() > 0 && sh.stats.joined.load(Ordering::Relaxed) == 0 {
        engine::close_all(&sh, sessions).await;
        let _ = progress.finish().await;
        bail!("no member could join: {}", engine::failure_words(&sh, &plan, "join"));
    }
    if timed_out > 0 {
        warnings.push(format!("{timed_out} joins got no answer within --join-timeout"));
    }
    let st = &sh.stats;
    let connections = Connections {
        planned: plan.specs.len() as u64,
        established: st.connected.load(Ordering::Relaxed),
        failed: st.connect_failed.load(Ordering::Relaxed),
        per_second: if connect_s > 0.0 { st.connected.load(Ordering::Relaxed) as f64 / connect_s } else { 0.0 },
        open_at_end: 0,
    };
    let joins = Joins {
        planned: plan.joins() as u64,
        joined: st.joined.load(Ordering::Relaxed),
        failed: st.join_failed.load(Ordering::Relaxed),
        timed_out,
    };

    let mut steps: Vec<Step> = Vec::new();
    let mut stopped = format!("the last step ({}) was run", rates.len());
    for (i, &rate) in rates.iter().enumerate() {
        let scale = start_rate / rate;
        st.counting.store(false, Ordering::SeqCst);
        st.reset_step();
        sh.set_schedule_scale(scale);
        // Only the first step waits for --start-at; the next ones follow.
        let start_at = if i == 0 { common.start_at } else { None };
        let start_ns = engine::send_start(clock, start_at, &mut warnings);
        let end_ns = start_ns + phase_args.duration.as_nanos() as u64;
        sh.send_start_ns.store(start_ns, Ordering::SeqCst);
        st.counting.store(true, Ordering::SeqCst);
        let senders: Vec<_> =
            sessions.iter().filter_map(|s| s.ticks.as_ref()).map(|(sch, tx)| (sh.scaled(sch), tx.clone())).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let pacer =
            pacer::spawn(clock, start_ns, end_ns, senders, stop.clone()).context("cannot start the pacer thread")?;
        intr.sleep_until(clock.instant_at(start_ns).into()).await;
        phase.set(Phase::Send);
        let c0 = server.cpu();
        let s0 = proc::cpu_seconds("self").unwrap_or(0.0);
        let ts = Instant::now();
        if intr.sleep_until(clock.instant_at(end_ns).into()).await {
            stop.store(true, Ordering::SeqCst);
        }
        let c1 = server.cpu();
        let s1 = proc::cpu_seconds("self").unwrap_or(0.0);
        let send_s = ts.elapsed().as_secs_f64();
        phase.set(Phase::Drain);
        intr.sleep(phase_args.drain).await;
        stop.store(true, Ordering::SeqCst);
        let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
        st.counting.store(false, Ordering::SeqCst);

        let merged = st.merged();
        let sent = st.sent.load(Ordering::Relaxed);
        let acked = st.acked.load(Ordering::Relaxed);
        let (mut expected, mut missing) = (0u64, 0u64);
        for (r, delivered) in merged.delivered_room.iter().enumerate() {
            let e = st.acked_room[r].load(Ordering::Relaxed) * st.room_members[r].load(Ordering::Relaxed);
            expected += e;
            missing += e.saturating_sub(*delivered);
        }
        let issues = st.issues().clone();
        let refused = issues.errors.0.get("rate_limited").map_or(0, |e| e.0);
        if let Some(w) = scenario::rate_limited_warning(refused, plan.max_sender_rate() / scale) {
            warnings.push(format!("step {}: {w}", i + 1));
        }
        let mut events = Event::from_tally("error", &issues.errors);
        events.extend(Event::from_tally("close", &issues.closes));
        let per_s = |n: u64| if send_s > 0.0 { n as f64 / send_s } else { 0.0 };
        let mut step = Step {
            rate,
            offered_per_s: base_offered / scale,
            send_s,
            sent,
            acked,
            sent_per_s: per_s(sent),
            acked_per_s: per_s(acked),
            delivered: merged.delivered,
            expected,
            missing,
            delivered_per_s: per_s(merged.delivered),
            gaps: merged.gaps,
            duplicates: merged.duplicates,
            reorders: merged.reorders,
            events,
            delivery: Percentiles::from_hist(&merged.delivery),
            ack: Percentiles::from_hist(&merged.ack),
            server_cpu_percent: c0.zip(c1).filter(|_| send_s > 0.0).map(|(a, b)| (b - a) * 100.0 / send_s),
            loadgen_cpu_percent: if send_s >= engine::MIN_PHASE_FOR_PERCENT { (s1 - s0) * 100.0 / send_s } else { 0.0 },
            met: false,
            broke: vec![],
        };
        step.broke = limits_.broken(&step);
        step.met = step.broke.is_empty();
        if !common.quiet {
            eprintln!("{}", step_line(i, &step));
        }
        let broke = !step.met;
        let why = step.broke.join("; ");
        steps.push(step);
        if intr.is_set() {
            stopped = format!("interrupted at step {}", i + 1);
            warnings.push("interrupted: the sweep was cut short".into());
            break;
        }
        if broke {
            stopped = format!("step {} (rate {rate}) broke a condition: {why}", i + 1);
            break;
        }
        if sh.stats.up.load(Ordering::Relaxed) == 0 {
            stopped = format!("every connection had ended after step {}", i + 1);
            break;
        }
    }
    let open_at_end = st.up.load(Ordering::Relaxed);
    phase.set(Phase::Close);
    engine::close_all(&sh, sessions).await;
    let _ = progress.finish().await;
    if steps.iter().any(|s| s.loadgen_cpu_percent > 80.0 * common.threads.max(1) as f64) {
        warnings.push(format!(
            "loadgen used over {}% CPU in a step ({} worker threads): it may have been the bottleneck",
            80 * common.threads.max(1),
            common.threads
        ));
    }
    let stepped = match inner {
        Scenario::Chat(_) => "rate_per_user",
        _ => "rate",
    };
    Ok(SweepSummary {
        scenario: "sweep".into(),
        target: inner.name().into(),
        description: plan.description.clone(),
        params: serde_json::to_value(&cli).unwrap_or_default(),
        urls: common.urls.clone(),
        started_unix,
        stepped: stepped.into(),
        connections: Connections { open_at_end, ..connections },
        joins,
        capacity: capacity(&steps),
        steps,
        stopped,
        warnings,
    })
}

/// One step on one line (the progress output after each step).
fn step_line(i: usize, s: &Step) -> String {
    format!(
        "loadgen step {}: rate {} -> sent {:.0}/s delivered {:.0}/s p99 {:.0} us{}",
        i + 1,
        s.rate,
        s.sent_per_s,
        s.delivered_per_s,
        s.p99_us(),
        if s.met { String::new() } else { format!("  BROKE: {}", s.broke.join("; ")) }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(rate: f64, p99_us: f64, errors: u64) -> Step {
        let mut s = Step { rate, delivered: 10, sent: 10, acked: 10, ..Default::default() };
        s.delivery.count = 10;
        s.delivery.p99_us = p99_us;
        if errors > 0 {
            s.events.push(Event {
                kind: "error".into(),
                key: "rate_limited".into(),
                count: errors,
                sample: "x".into(),
            });
        }
        s
    }

    #[test]
    fn steps_by_factor_or_increment() {
        assert_eq!(rates(100.0, 2.0, None, 4, None), vec![100.0, 200.0, 400.0, 800.0]);
        assert_eq!(rates(100.0, 2.0, None, 10, Some(500.0)), vec![100.0, 200.0, 400.0]);
        assert_eq!(rates(100.0, 2.0, Some(50.0), 3, None), vec![100.0, 150.0, 200.0]);
        assert!(rates(100.0, 2.0, None, 0, None).is_empty());
    }

    #[test]
    fn conditions_and_capacity() {
        let l = Limits { max_p99: Some(Duration::from_millis(10)), ..Default::default() };
        assert!(l.broken(&step(1.0, 9_000.0, 0)).is_empty());
        assert!(l.broken(&step(1.0, 11_000.0, 0))[0].contains("p99"));
        assert!(l.broken(&step(1.0, 1.0, 3))[0].contains("rate_limited"));
        let lax = Limits { allow_errors: true, ..Default::default() };
        assert!(lax.broken(&step(1.0, 1.0, 3)).is_empty());
        let mut lossy = step(1.0, 1.0, 0);
        lossy.missing = 2;
        assert!(lax.broken(&lossy)[0].contains("2 missing"));

        let mut steps: Vec<Step> = [1.0, 2.0, 4.0].iter().map(|&r| step(r, 1.0, 0)).collect();
        steps.iter_mut().for_each(|s| s.met = true);
        assert_eq!(capacity(&steps).map(|c| c.rate), Some(4.0));
        steps[2].met = false;
        assert_eq!(capacity(&steps).map(|c| c.rate), Some(2.0));
        steps[0].met = false;
        assert!(capacity(&steps).is_none());
    }
}
