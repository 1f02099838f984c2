//! Runs a plan: connect every connection (bounded concurrency, optional
//! rate), wait until every member is joined (the barrier), measure the
//! server at rest, run the send phase on the pacer's clock (or hold), drain,
//! take the figures, close everything, and build the summary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cli::{Cli, Common};
use crate::client::{Connector, Target, COMPRESSED_CONNECTIONS};
use crate::clock::Clock;
use crate::frames::WIRE_BYTES_IN;
use crate::histo::Histograms;
use crate::interrupt::Interrupt;
use crate::limits;
use crate::pacer;
use crate::proc::{self, ServerProcs};
use crate::progress::{Phase, PhaseCell, Progress};
use crate::scenario::{self, Plan, Timing};
use crate::session::{self, Session, Shared};
use crate::stats::Stats;
use crate::summary::{
    curve, ChurnFigures, Connections, Curves, Event, Joins, Latencies, LoadgenFigures, Messages, Percentiles, Phases,
    PresenceFigures, RoomCounts, ServerFigures, Summary, WireFigures,
};
use crate::token::TokenSource;
use crate::verdict;

/// Lead time between arming the pacer and the first due message.
pub(crate) const SEND_LEAD: Duration = Duration::from_millis(20);

/// Shortest phase whose CPU share is reported: CPU time comes in 10 ms
/// ticks, so over a few milliseconds one tick reads as hundreds of percent.
pub const MIN_PHASE_FOR_PERCENT: f64 = 0.5;

/// Run the scenario of `cli` and return its figures. Fails when the run
/// could not be done at all (bad options, nothing to connect to, every
/// connection or join refused).
pub async fn run(cli: Cli) -> Result<Summary> {
    if let crate::cli::Scenario::Sweep(_) = cli.scenario {
        bail!("a sweep runs through loadgen::sweep::run");
    }
    let common = &cli.common;
    let clock = Clock::new();
    let started_unix = clock.unix_secs();
    let plan = scenario::plan(&cli.scenario)?.split(common.id, common.of)?;
    if common.urls.is_empty() {
        bail!("no --url given");
    }
    let fd_limit = limits::check_fd_budget(plan.specs.len())?;
    let server = ServerProcs::new(&common.server_pids)?;

    let measured = match plan.timing {
        Timing::Send { duration, drain } => duration + drain,
        Timing::Hold(d) => d,
    };
    let setup = common.connect_rate.filter(|r| *r > 0.0).map(|r| plan.specs.len() as f64 / r).unwrap_or(0.0)
        + common.join_timeout.as_secs_f64()
        + common.settle.as_secs_f64();
    let lifetime = measured.as_secs() + setup as u64 + 600;
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
    let mut connector =
        Connector::new(targets, common.source_ips, common.connect_timeout).with_compression(common.compression);
    if let Some(ca) = &common.tls_ca {
        connector = connector.with_tls(crate::client::tls_trusting(ca)?);
    }
    let connector = Arc::new(connector);
    let stats = Stats::new(plan.rooms.len(), common.threads.max(1) * 4)?;
    let mut shared = Shared::new(stats, clock, plan.rooms.clone());
    shared.presence = common.presence;
    shared.churn_away = common.churn_away;
    if let Some(path) = &common.record {
        shared.record = Some(crate::record::Recorder::create(path)?);
    }
    if common.reconnect {
        shared.redial = Some(session::Redial { connector: connector.clone(), tokens: tokens.clone() });
    }
    shared.room_members = vec![0; plan.rooms.len()];
    for room in plan.specs.iter().flat_map(|s| &s.joins) {
        if let Some(n) = shared.room_members.get_mut(*room) {
            *n += 1;
        }
    }
    let sh = Arc::new(shared);
    let phase = PhaseCell::default();

    let mut warnings = plan.warnings.clone();
    if tokens.is_shared() && plan.specs.len() > 1 {
        warnings.push("--token-file: every connection uses the same token (one sub)".into());
    }

    if !common.quiet {
        eprintln!("loadgen {}", plan.description);
        for w in &warnings {
            eprintln!("loadgen: warning: {w}");
        }
    }
    let intr = Interrupt::install();
    let progress = Progress::start(sh.clone(), phase.clone(), plan.specs.len(), common.quiet);
    let t0 = Instant::now();
    let run_start_ns = sh.clock.now_ns();
    let rss_before = server.rss();
    let cpu_before = server.cpu();
    let self_cpu_start = proc::cpu_seconds("self").unwrap_or(0.0);

    // Connect.
    phase.set(Phase::Connect);
    let sessions = connect_all(&plan, &connector, &tokens, &sh, common, &intr).await;
    let connect_s = t0.elapsed().as_secs_f64();
    if intr.is_set() {
        close_all(&sh, sessions).await;
        let _ = progress.finish().await;
        bail!("interrupted while connecting");
    }
    if sessions.is_empty() {
        let _ = progress.finish().await;
        bail!("could not connect: {}", failure_words(&sh, &plan, "connect"));
    }

    // Join barrier.
    phase.set(Phase::Join);
    let tj = Instant::now();
    let timed_out = wait_joins(&sh, common.join_timeout, &intr).await;
    let join_s = tj.elapsed().as_secs_f64();
    let cpu_connected = server.cpu();
    let self_cpu_connect = proc::cpu_seconds("self").unwrap_or(0.0) - self_cpu_start;
    if plan.joins() > 0 && sh.stats.joined.load(Ordering::Relaxed) == 0 {
        close_all(&sh, sessions).await;
        let _ = progress.finish().await;
        bail!("no member could join: {}", failure_words(&sh, &plan, "join"));
    }
    if !server.is_empty() {
        phase.set(Phase::Settle);
        intr.sleep(common.settle).await;
    }
    if intr.is_set() {
        close_all(&sh, sessions).await;
        let _ = progress.finish().await;
        bail!("interrupted before the measured phase");
    }
    let rss_connected = server.rss();

    // Measured phase.
    let mut sessions = sessions;
    let (mut send_s, mut drain_s, mut hold_s) = (0.0, 0.0, 0.0);
    let (mut cpu_send, mut cpu_send_drain) = (None, None);
    let mut delivered_in_send = 0;
    let mut send_window = (0.0, 0.0);
    let measure_at_s;
    let self_cpu0;
    let self_cpu1;
    let wire0;
    let phase_secs;
    // `--churn`, this process's share of it.
    let churn_rate = common.churn.filter(|r| *r > 0.0 && r.is_finite()).map(|r| r / common.of.max(1) as f64);
    let churn_stop = Arc::new(AtomicBool::new(false));
    let mut churn_task = None;
    let presence0 =
        (sh.stats.presence_frames.load(Ordering::Relaxed), sh.stats.presence_states.load(Ordering::Relaxed));
    let cpu_measured;
    match plan.timing {
        Timing::Send { duration, drain } => {
            let start_ns = send_start(clock, common.start_at, &mut warnings);
            let end_ns = start_ns + duration.as_nanos() as u64;
            send_window = (start_ns as f64 / 1e9, end_ns as f64 / 1e9);
            sh.send_start_ns.store(start_ns, Ordering::SeqCst);
            sh.stats.counting.store(true, Ordering::SeqCst);
            let senders: Vec<_> = sessions.iter_mut().filter_map(|s| s.ticks.take()).collect();
            let stop = Arc::new(AtomicBool::new(false));
            let pacer = pacer::spawn(clock, start_ns, end_ns, senders, stop.clone())
                .context("cannot start the pacer thread")?;
            if let Some(rate) = churn_rate {
                churn_task = crate::churn::spawn(&sessions, rate, start_ns, end_ns, sh.clone(), churn_stop.clone());
            }
            intr.sleep_until(clock.instant_at(start_ns).into()).await;
            phase.set(Phase::Send);
            measure_at_s = t0.elapsed().as_secs_f64();
            let c0 = server.cpu();
            self_cpu0 = proc::cpu_seconds("self").unwrap_or(0.0);
            wire0 = WIRE_BYTES_IN.load(Ordering::Relaxed);
            let ts = Instant::now();
            if intr.sleep_until(clock.instant_at(end_ns).into()).await {
                stop.store(true, Ordering::SeqCst);
            }
            let c1 = server.cpu();
            self_cpu1 = proc::cpu_seconds("self").unwrap_or(0.0);
            delivered_in_send = sh.stats.delivered_total();
            send_s = ts.elapsed().as_secs_f64();
            phase_secs = send_s;
            phase.set(Phase::Drain);
            let td = Instant::now();
            intr.sleep(drain).await;
            drain_s = td.elapsed().as_secs_f64();
            let c2 = server.cpu();
            stop.store(true, Ordering::SeqCst);
            let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
            cpu_send = c0.zip(c1).map(|(a, b)| b - a);
            cpu_measured = cpu_send;
            cpu_send_drain = c0.zip(c2).map(|(a, b)| b - a);
        }
        Timing::Hold(d) => {
            phase.set(Phase::Hold);
            measure_at_s = t0.elapsed().as_secs_f64();
            sh.stats.counting.store(true, Ordering::SeqCst);
            self_cpu0 = proc::cpu_seconds("self").unwrap_or(0.0);
            wire0 = WIRE_BYTES_IN.load(Ordering::Relaxed);
            let c0 = server.cpu();
            if let Some(rate) = churn_rate {
                let start_ns = clock.now_ns();
                // No drain follows a hold: the last leave is early enough
                // for its rejoin to be answered within it.
                let end_ns =
                    start_ns + d.saturating_sub(common.churn_away + Duration::from_millis(100)).as_nanos() as u64;
                churn_task = crate::churn::spawn(&sessions, rate, start_ns, end_ns, sh.clone(), churn_stop.clone());
            }
            let th = Instant::now();
            intr.sleep(d).await;
            hold_s = th.elapsed().as_secs_f64();
            cpu_measured = c0.zip(server.cpu()).map(|(a, b)| b - a);
            self_cpu1 = proc::cpu_seconds("self").unwrap_or(0.0);
            phase_secs = hold_s;
        }
    }

    if intr.is_set() {
        warnings.push("interrupted: the measured phase was cut short".into());
    }
    let wire_in = WIRE_BYTES_IN.load(Ordering::Relaxed).saturating_sub(wire0);
    churn_stop.store(true, Ordering::SeqCst);
    if let Some(t) = churn_task {
        let _ = t.await;
    }
    let presence1 =
        (sh.stats.presence_frames.load(Ordering::Relaxed), sh.stats.presence_states.load(Ordering::Relaxed));

    // Figures.
    sh.stats.counting.store(false, Ordering::SeqCst);
    sh.stats.closing.store(true, Ordering::SeqCst);
    let open_at_end = sh.stats.up.load(Ordering::Relaxed);
    let rss_end = server.rss();
    let merged = sh.stats.merged();
    let connect_hist = crate::stats::lock(&sh.stats.connect_hist).clone();
    let issues = sh.stats.issues().clone();
    phase.set(Phase::Close);
    close_all(&sh, sessions).await;
    let timeline = progress.finish().await;
    if let Some(rec) = &sh.record {
        rec.flush()?;
    }

    let st = &sh.stats;
    let established = st.connected.load(Ordering::Relaxed);
    let sent = st.sent.load(Ordering::Relaxed);
    let acked = st.acked.load(Ordering::Relaxed);
    let (mut expected, mut missing, mut extra) = (0u64, 0u64, 0u64);
    for (r, delivered) in merged.delivered_room.iter().enumerate() {
        let e = st.acked_room[r].load(Ordering::Relaxed) * st.room_members[r].load(Ordering::Relaxed);
        expected += e;
        missing += e.saturating_sub(*delivered);
        extra += delivered.saturating_sub(e);
    }
    let per_s = |n: u64| if send_s > 0.0 { n as f64 / send_s } else { 0.0 };

    let refused = issues.errors.0.get("rate_limited").map_or(0, |e| e.0);
    warnings.extend(scenario::rate_limited_warning(refused, plan.max_sender_rate()));
    let mut events = Event::from_tally("connect", &issues.connect);
    events.extend(Event::from_tally("join", &issues.join));
    events.extend(Event::from_tally("error", &issues.errors));
    events.extend(Event::from_tally("close", &issues.closes));

    let server_fig = (!server.is_empty()).then(|| {
        let cpu_connect = cpu_before.zip(cpu_connected).map(|(a, b)| b - a);
        ServerFigures {
            pids: server.pids().to_vec(),
            cpu_s_connect: cpu_connect,
            cpu_s_send: cpu_send,
            cpu_s_send_drain: cpu_send_drain,
            cpu_us_per_delivery: cpu_send.filter(|_| delivered_in_send > 0).map(|c| c * 1e6 / delivered_in_send as f64),
            cpu_us_per_connection: cpu_connect.filter(|_| established > 0).map(|c| c * 1e6 / established as f64),
            cpu_percent_send: cpu_send.filter(|_| send_s > 0.0).map(|c| c * 100.0 / send_s),
            rss_before_bytes: rss_before,
            rss_connected_bytes: rss_connected,
            rss_end_bytes: rss_end,
            bytes_per_connection: rss_before
                .zip(rss_connected)
                .filter(|_| established > 0)
                .map(|(a, b)| (b as f64 - a as f64) / established as f64),
        }
    });
    let self_cpu = self_cpu1 - self_cpu0;
    let loadgen = LoadgenFigures {
        threads: common.threads,
        cpu_s_connect: self_cpu_connect,
        cpu_s: self_cpu,
        cpu_percent: if phase_secs >= MIN_PHASE_FOR_PERCENT { self_cpu * 100.0 / phase_secs } else { 0.0 },
        rss_bytes: proc::rss_bytes("self").unwrap_or(0),
        open_files_limit: fd_limit,
    };
    if loadgen.cpu_percent > 80.0 * common.threads.max(1) as f64 {
        warnings.push(format!(
            "loadgen used {:.0}% CPU ({} worker threads): it may have been the bottleneck",
            loadgen.cpu_percent, common.threads
        ));
    }

    let mut summary = Summary {
        scenario: cli.scenario.name().to_string(),
        description: plan.description.clone(),
        params: serde_json::to_value(&cli).unwrap_or_default(),
        urls: common.urls.clone(),
        started_unix,
        ok: false,
        phases: Phases {
            measure_at_s,
            connect_s,
            join_s,
            send_s,
            drain_s,
            hold_s,
            total_s: t0.elapsed().as_secs_f64(),
            send_start_unix_s: send_window.0,
            send_end_unix_s: send_window.1,
        },
        connections: Connections {
            planned: plan.specs.len() as u64,
            established,
            failed: st.connect_failed.load(Ordering::Relaxed),
            per_second: if connect_s > 0.0 { established as f64 / connect_s } else { 0.0 },
            open_at_end,
        },
        joins: Joins {
            planned: plan.joins() as u64,
            joined: st.joined.load(Ordering::Relaxed),
            failed: st.join_failed.load(Ordering::Relaxed),
            timed_out,
        },
        messages: Messages {
            sent,
            acked,
            unacked: sent.saturating_sub(acked),
            sent_per_s: per_s(sent),
            delivered: merged.delivered,
            expected,
            missing,
            extra,
            delivered_per_s: per_s(merged.delivered),
            gaps: merged.gaps,
            gap_seqs: merged.gap_seqs,
            duplicates: merged.duplicates,
            reorders: merged.reorders,
            foreign: merged.foreign,
        },
        latency: Latencies {
            delivery: Percentiles::from_hist(&merged.delivery),
            delivery_from_send: Percentiles::from_hist(&merged.delivery_from_send),
            ack: Percentiles::from_hist(&merged.ack),
            connect: Percentiles::from_hist(&connect_hist),
        },
        curves: Curves {
            delivery: curve(&merged.delivery),
            delivery_from_send: curve(&merged.delivery_from_send),
            ack: curve(&merged.ack),
            connect: curve(&connect_hist),
        },
        server: server_fig,
        presence: common.presence.then(|| {
            let subscribers = plan.joins() as u64;
            let frames = st.presence_frames.load(Ordering::Relaxed);
            let last = st.presence_complete_last_ns.load(Ordering::Relaxed);
            PresenceFigures {
                subscribers,
                frames,
                states: st.presence_states.load(Ordering::Relaxed),
                diffs: frames.saturating_sub(st.presence_states.load(Ordering::Relaxed)),
                frames_per_subscriber: if subscribers > 0 { frames as f64 / subscribers as f64 } else { 0.0 },
                complete: st.presence_complete.load(Ordering::Relaxed),
                complete_after_s: (last > 0).then(|| last.saturating_sub(run_start_ns) as f64 / 1e9),
            }
        }),
        churn: churn_rate.map(|rate| {
            let leaves = st.churn_leaves.load(Ordering::Relaxed);
            let subscribers = if common.presence { plan.joins() as u64 } else { 0 };
            let frames = presence1.0 - presence0.0;
            let states = presence1.1 - presence0.1;
            ChurnFigures {
                rate,
                away_s: common.churn_away.as_secs_f64(),
                leaves,
                rejoins: st.churn_rejoins.load(Ordering::Relaxed),
                unrecovered: st.churn_unrecovered.load(Ordering::Relaxed),
                failed: st.churn_failed.load(Ordering::Relaxed),
                skipped: st.churn_skipped.load(Ordering::Relaxed),
                per_s: if phase_secs > 0.0 { leaves as f64 / phase_secs } else { 0.0 },
                presence_frames: frames,
                presence_states: states,
                presence_diffs: frames - states,
                presence_frames_per_subscriber: if subscribers > 0 { frames as f64 / subscribers as f64 } else { 0.0 },
                server_cpu_us_per_churn: cpu_measured.filter(|_| leaves > 0).map(|c| c * 1e6 / leaves as f64),
            }
        }),
        loadgen,
        wire: WireFigures {
            compression_offered: common.compression,
            compressed_connections: COMPRESSED_CONNECTIONS.load(Ordering::Relaxed),
            bytes_in: wire_in,
            bytes_in_per_delivery: if merged.delivered > 0 { wire_in as f64 / merged.delivered as f64 } else { 0.0 },
        },
        events,
        problems: vec![],
        warnings,
        timeline,
        histograms: Histograms::encode(&merged.delivery, &merged.delivery_from_send, &merged.ack, &connect_hist),
        rooms: plan
            .rooms
            .iter()
            .enumerate()
            .map(|(r, name)| RoomCounts {
                name: name.clone(),
                members: st.room_members[r].load(Ordering::Relaxed),
                acked: st.acked_room[r].load(Ordering::Relaxed),
                delivered: merged.delivered_room[r],
            })
            .collect(),
    };
    summary.problems = verdict::problems(&summary);
    summary.ok = summary.problems.is_empty();
    Ok(summary)
}

/// When the send phase starts, Unix ns on `clock`: `--start-at` when given
/// and still ahead (so processes started apart send together), else right
/// away (a `--start-at` already past is said in a warning).
pub(crate) fn send_start(clock: Clock, start_at: Option<f64>, warnings: &mut Vec<String>) -> u64 {
    let soonest = clock.now_ns() + SEND_LEAD.as_nanos() as u64;
    match start_at {
        Some(t) if t.is_finite() && t > 0.0 => {
            let at = (t * 1e9) as u64;
            if at < soonest {
                warnings.push(format!(
                    "--start-at {t} was {:.3} s past when the send phase could start: it started at once",
                    (soonest - at) as f64 / 1e9
                ));
                soonest
            } else {
                at
            }
        }
        _ => soonest,
    }
}

/// Open every connection of the plan; returns those that got a 101.
pub(crate) async fn connect_all(
    plan: &Plan,
    connector: &Arc<Connector>,
    tokens: &Arc<TokenSource>,
    sh: &Arc<Shared>,
    common: &Common,
    intr: &Interrupt,
) -> Vec<Session> {
    let sem = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let start = tokio::time::Instant::now();
    let rate = common.connect_rate.filter(|r| *r > 0.0 && r.is_finite());
    // With nothing but failures after this many attempts, stop trying.
    let give_up_after = (common.connect_concurrency.max(1) * 2).clamp(64, 1024) as u64;
    let mut handles = Vec::with_capacity(plan.specs.len());
    for (i, spec) in plan.specs.iter().enumerate() {
        if let Some(r) = rate {
            intr.sleep_until(start + Duration::from_secs_f64(i as f64 / r)).await;
        }
        if intr.is_set() {
            break;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let st = &sh.stats;
        if st.connected.load(Ordering::Relaxed) == 0 && st.connect_failed.load(Ordering::Relaxed) >= give_up_after {
            let n = plan.specs.len() - i;
            st.issues().connect.add("not attempted", || {
                format!("{n} connections not attempted after {give_up_after} failures in a row")
            });
            break;
        }
        let (connector, tokens, sh, spec) = (connector.clone(), tokens.clone(), sh.clone(), spec.clone());
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let st = &sh.stats;
            let token = match tokens.token_for(spec.id) {
                Ok(t) => t,
                Err(e) => {
                    st.connect_failed.fetch_add(1, Ordering::Relaxed);
                    st.issues().connect.add("token", || format!("{e:#}"));
                    return None;
                }
            };
            match connector.connect(spec.id, &token).await {
                Ok(conn) => {
                    st.connected.fetch_add(1, Ordering::Relaxed);
                    st.record_connect(conn.connect_ns);
                    Some(session::start(conn, spec, sh.clone()))
                }
                Err(e) => {
                    st.connect_failed.fetch_add(1, Ordering::Relaxed);
                    st.issues().connect.add(&e.key(), || e.explain());
                    None
                }
            }
        }));
    }
    let mut sessions = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(Some(s)) = h.await {
            sessions.push(s);
        }
    }
    sessions
}

/// Wait until no join is outstanding; returns how many still are at the
/// timeout.
pub(crate) async fn wait_joins(sh: &Shared, timeout: Duration, intr: &Interrupt) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = sh.stats.join_pending.load(Ordering::SeqCst);
        if pending <= 0 {
            return 0;
        }
        if Instant::now() >= deadline || intr.is_set() {
            return pending as u64;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Send every connection a close frame, give the readers a moment to see
/// the server's answer, then stop all tasks.
pub(crate) async fn close_all(sh: &Shared, sessions: Vec<Session>) {
    sh.stats.closing.store(true, Ordering::SeqCst);
    let mut closers = JoinSet::new();
    for s in &sessions {
        let w = s.writer.clone();
        closers.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = w.lock().await.close(1000).await;
            })
            .await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while closers.join_next().await.is_some() {} }).await;
    let deadline = Instant::now() + Duration::from_millis(500);
    while sh.stats.up.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for s in sessions {
        for t in s.tasks {
            t.abort();
        }
    }
}

/// The failures of one kind, in words, for a run that could not go on.
pub(crate) fn failure_words(sh: &Shared, plan: &Plan, kind: &str) -> String {
    let issues = sh.stats.issues().clone();
    let tally = match kind {
        "connect" => &issues.connect,
        _ => &issues.join,
    };
    let events = Event::from_tally(kind, tally);
    if events.is_empty() {
        return "no reason recorded".to_string();
    }
    events
        .iter()
        .map(|e| verdict::describe(e, plan.specs.len() as u64, plan.joins() as u64))
        .collect::<Vec<_>>()
        .join("; ")
}
