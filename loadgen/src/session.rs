//! One connection's life after the upgrade: a reader task that joins the
//! connection's rooms, answers pings, and checks and times every frame it
//! gets (deliveries, acks, joins, errors, the close); and, for connections
//! that send, a send task that turns the pacer's due counters into `send`
//! frames stamped with their scheduled time, batching whatever is due into
//! one write.
//!
//! With `--churn`, the churn driver (`churn.rs`) writes a `leave` on a
//! member's connection; its reader, on `left`, rejoins the room with `since`
//! = the last seq it saw and that seq's epoch. Waiting for `left` matters:
//! every message the server delivered before the leave arrives before
//! `left`, so `since` is exact and the replay neither repeats nor skips a
//! message; the seq check and the expected deliveries (acked x members)
//! hold across the leave and the rejoin.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::OpCode;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

use crate::client::{Conn, Connector, SharedWriter};
use crate::clock::Clock;
use crate::frames::{Frame, FrameReader, ReadError};
use crate::pacer::Schedule;
use crate::parse::{parse, ServerFrame};
use crate::record::{Event, Recorder};
use crate::stats::{SeqCheck, SeqTrack, Stats};
use crate::token::TokenSource;

/// Most frames one write carries when the send task catches up.
const MAX_BATCH: u64 = 64;

/// What every connection task shares.
pub struct Shared {
    pub stats: Stats,
    pub clock: Clock,
    /// Room names, and the same as JSON string literals.
    pub rooms: Vec<String>,
    pub rooms_json: Vec<String>,
    /// Start of the send phase, Unix ns (schedules count from it).
    pub send_start_ns: AtomicU64,
    /// `--presence`: joins ask for presence frames.
    pub presence: bool,
    /// `--churn-away`: how long a churned member stays out of its room.
    pub churn_away: std::time::Duration,
    /// Members each room will have once every join is done.
    pub room_members: Vec<u64>,
    /// `--record`: every event of every connection, for `loadgen audit`.
    pub record: Option<Recorder>,
    /// `--reconnect`: how a connection the server ended is opened again.
    pub redial: Option<Redial>,
    /// The factor every schedule's times are multiplied by (f64 bits):
    /// 1.0 in a plain run; a sweep step at k times the planned rate sets
    /// 1/k, so the same connections send faster without a new plan.
    schedule_scale: AtomicU64,
}

impl Shared {
    pub fn new(stats: Stats, clock: Clock, rooms: Vec<String>) -> Self {
        let rooms_json =
            rooms.iter().map(|r| serde_json::to_string(r).unwrap_or_else(|_| format!("\"{r}\""))).collect();
        Self {
            stats,
            clock,
            rooms,
            rooms_json,
            send_start_ns: AtomicU64::new(0),
            presence: false,
            churn_away: std::time::Duration::ZERO,
            room_members: Vec::new(),
            record: None,
            redial: None,
            schedule_scale: AtomicU64::new(1.0f64.to_bits()),
        }
    }

    /// Scale every schedule's times by `scale` from the next send phase on.
    pub fn set_schedule_scale(&self, scale: f64) {
        self.schedule_scale.store(scale.to_bits(), Ordering::SeqCst);
    }

    /// `s` as the current send phase runs it (see `schedule_scale`).
    #[inline]
    pub fn scaled(&self, s: &Schedule) -> Schedule {
        let k = f64::from_bits(self.schedule_scale.load(Ordering::Relaxed));
        if k == 1.0 {
            return *s;
        }
        Schedule { offset_ns: (s.offset_ns as f64 * k) as u64, interval_ns: s.interval_ns * k }
    }
}

/// `--reconnect`: what a connection needs to open itself again. A
/// connection the server ended (a node killed, drained or cut) waits a
/// moment, connects to the next node (round robin from its own), and
/// rejoins each of its rooms with `since` = the last seq it saw and that
/// seq's epoch; a rejoin answered `unavailable` is tried again.
pub struct Redial {
    pub connector: Arc<Connector>,
    pub tokens: Arc<TokenSource>,
}

/// First wait before a reconnect, and the longest (it doubles on failure).
const REDIAL_FIRST: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(1);
/// Wait before a rejoin answered `unavailable` is sent again.
const REJOIN_RETRY: Duration = Duration::from_millis(500);

/// What one connection does.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Connection number: picks the token's `sub`, the node, the source
    /// address and the stats shard.
    pub id: usize,
    /// Rooms (indexes into the plan's rooms) it joins and receives from.
    pub joins: Vec<usize>,
    /// Whether and how it sends.
    pub send: Option<SendSpec>,
}

#[derive(Debug, Clone)]
pub struct SendSpec {
    /// Rooms it sends to, message k to `rooms[k % len]`.
    pub rooms: Vec<usize>,
    pub schedule: Schedule,
    /// Body size in bytes.
    pub payload: usize,
}

/// A running connection.
pub struct Session {
    pub id: usize,
    /// Rooms it joined (for the churn driver).
    pub rooms: Vec<usize>,
    /// Set by the churn driver when it sends a leave, cleared by the reader
    /// once the rejoin is answered: one churn at a time per connection.
    pub churning: Arc<AtomicBool>,
    pub writer: SharedWriter,
    pub tasks: Vec<JoinHandle<()>>,
    /// For the pacer: the schedule and where to send due counters.
    pub ticks: Option<(Schedule, UnboundedSender<u64>)>,
}

/// Start the tasks of an upgraded connection.
pub fn start(conn: Conn, spec: Spec, sh: Arc<Shared>) -> Session {
    let Conn { reader, writer, target, .. } = conn;
    sh.stats.up.fetch_add(1, Ordering::Relaxed);
    if let Some(rec) = &sh.record {
        let mut ev = Event::new("c", sh.clock.now_ns(), spec.id as u64);
        ev.n = Some(target as u64);
        rec.event(&ev);
    }
    if !spec.joins.is_empty() {
        sh.stats.join_pending.fetch_add(spec.joins.len() as i64, Ordering::SeqCst);
    }
    let send = spec.send.map(Arc::new);
    let churning = Arc::new(AtomicBool::new(false));
    let state = ReaderState {
        id: spec.id,
        tracks: spec
            .joins
            .iter()
            .map(|&room| Track { room, seq: SeqTrack::default(), join: JoinState::Pending, epoch: None })
            .collect(),
        pending: spec.joins.len(),
        send: send.clone(),
        presence_complete: false,
        churning: churning.clone(),
        outbox: Vec::new(),
        retry: Vec::new(),
        redials: 0,
        generation: Arc::new(AtomicU64::new(0)),
    };
    let mut tasks = vec![tokio::spawn(read_loop(reader, writer.clone(), state, sh.clone()))];
    let mut ticks = None;
    if let Some(send) = send {
        let (tx, rx) = unbounded_channel();
        ticks = Some((send.schedule, tx));
        tasks.push(tokio::spawn(send_loop(spec.id, rx, writer.clone(), send, sh)));
    }
    Session { id: spec.id, rooms: spec.joins, churning, writer, tasks, ticks }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinState {
    Pending,
    Joined,
    Failed,
    /// Left for churn; the rejoin with `since` is sent, `joined` awaited.
    Rejoining,
    /// Reconnected (`--reconnect`); the rejoin with `since` is sent,
    /// `joined` awaited.
    Resuming,
}

struct Track {
    room: usize,
    seq: SeqTrack,
    join: JoinState,
    /// The epoch of the last `joined`, sent back with `since` on a rejoin.
    epoch: Option<String>,
}

struct ReaderState {
    id: usize,
    tracks: Vec<Track>,
    /// Joins not yet answered.
    pending: usize,
    send: Option<Arc<SendSpec>>,
    /// A presence frame already showed every member of the room.
    presence_complete: bool,
    /// See `Session::churning`.
    churning: Arc<AtomicBool>,
    /// Frames to write once the frames of the current read are handled
    /// (rejoins).
    outbox: Vec<String>,
    /// Rejoins answered `unavailable`, to send again after `REJOIN_RETRY`.
    retry: Vec<String>,
    /// Reconnects so far (`--reconnect`): picks the next node. A delayed
    /// write (a churn rejoin after `--churn-away`, a retried rejoin) is
    /// dropped when the connection was replaced meanwhile: the new one
    /// rejoined on its own, and a second join with an older `since` would
    /// replay messages again.
    redials: usize,
    generation: Arc<AtomicU64>,
}

async fn read_loop(mut reader: FrameReader, writer: SharedWriter, mut st: ReaderState, sh: Arc<Shared>) {
    let mut joins = send_joins(&writer, &st, &sh).await;
    loop {
        let end = match joins {
            Err(e) => format!("io: {:?}", e.kind()),
            Ok(()) => read_frames(&mut reader, &writer, &mut st, &sh).await,
        };
        st.on_end(&end, &sh);
        let Some(redial) = &sh.redial else { return };
        match redial_conn(redial, &mut st, &writer, &sh).await {
            Some((r, sent)) => (reader, joins) = (r, sent),
            None => return,
        }
    }
}

/// `--reconnect`: open the connection again (the next node first, then
/// the others in turn), put its writer in place of the dead one and write
/// the rejoins on it before anything else can (a churn leave must not
/// reach the server before the join it leaves); None once loadgen is
/// closing.
async fn redial_conn(
    redial: &Redial,
    st: &mut ReaderState,
    writer: &SharedWriter,
    sh: &Shared,
) -> Option<(FrameReader, io::Result<()>)> {
    let mut wait = REDIAL_FIRST;
    loop {
        // Spread the reconnects of a whole node's members a little.
        let jitter = Duration::from_millis((st.id as u64 * 37 + st.redials as u64 * 11) % 100);
        tokio::time::sleep(wait + jitter).await;
        if sh.stats.closing.load(Ordering::Relaxed) {
            return None;
        }
        st.redials += 1;
        let token = redial.tokens.token_for(st.id).ok()?;
        match redial.connector.connect(st.id + st.redials, &token).await {
            Ok(conn) => {
                let sent = {
                    let mut fresh = conn.writer.lock().await;
                    let mut w = writer.lock().await;
                    std::mem::swap(&mut *w, &mut *fresh);
                    st.generation.fetch_add(1, Ordering::SeqCst);
                    for f in st.rejoins(sh) {
                        w.push_text(f.as_bytes());
                    }
                    w.flush().await
                };
                sh.stats.up.fetch_add(1, Ordering::Relaxed);
                sh.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                if let Some(rec) = &sh.record {
                    let mut ev = Event::new("c", sh.clock.now_ns(), st.id as u64);
                    ev.n = Some(conn.target as u64);
                    rec.event(&ev);
                }
                return Some((conn.reader, sent));
            }
            Err(_) => wait = (wait * 2).min(REDIAL_MAX),
        }
    }
}

/// Reads until the connection ends; returns how it ended. Every frame of
/// one read gets the same receive time: they arrived together.
async fn read_frames(reader: &mut FrameReader, writer: &SharedWriter, st: &mut ReaderState, sh: &Shared) -> String {
    let mut now = sh.clock.now_ns();
    loop {
        loop {
            match reader.next_frame() {
                Ok(Some(Frame::Text(payload))) => st.on_text(payload, now, sh),
                Ok(Some(Frame::Ping(payload))) => {
                    let payload = payload.to_vec();
                    // A failed pong shows up as the read's error.
                    let _ = send_control(writer, OpCode::Pong, &payload).await;
                }
                Ok(Some(Frame::Close(payload))) => {
                    let end = close_key(payload);
                    let echo = payload.get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                    let _ = send_control(writer, OpCode::Close, &echo).await;
                    return end;
                }
                Ok(Some(Frame::Binary(_) | Frame::Pong)) => {}
                Ok(None) => break,
                Err(e) => return error_key(&e),
            }
        }
        if !st.outbox.is_empty() {
            let frames: Vec<String> = st.outbox.drain(..).collect();
            if sh.churn_away.is_zero() {
                write_frames(writer, &frames).await;
            } else {
                // `since` was fixed on `left` (nothing of the room arrives
                // after it), so the rejoin may wait without losing a seq.
                let (writer, away) = (writer.clone(), sh.churn_away);
                let (generation, now_gen) = (st.generation.clone(), st.generation.load(Ordering::SeqCst));
                tokio::spawn(async move {
                    tokio::time::sleep(away).await;
                    write_frames_on(&writer, &frames, &generation, now_gen).await;
                });
            }
        }
        if !st.retry.is_empty() {
            let frames: Vec<String> = st.retry.drain(..).collect();
            let writer = writer.clone();
            let (generation, now_gen) = (st.generation.clone(), st.generation.load(Ordering::SeqCst));
            tokio::spawn(async move {
                tokio::time::sleep(REJOIN_RETRY).await;
                write_frames_on(&writer, &frames, &generation, now_gen).await;
            });
        }
        if let Err(e) = reader.fill().await {
            return error_key(&e);
        }
        now = sh.clock.now_ns();
    }
}

/// Writes frames unless the connection is closing; a failed write shows up
/// as the reader's error.
async fn write_frames(writer: &SharedWriter, frames: &[String]) {
    let mut w = writer.lock().await;
    if w.is_closed() {
        return;
    }
    for frame in frames {
        w.push_text(frame.as_bytes());
    }
    let _ = w.flush().await;
}

/// [`write_frames`], unless the connection was replaced since `generation`
/// was `expected` (it is bumped under the writer's lock).
async fn write_frames_on(writer: &SharedWriter, frames: &[String], generation: &AtomicU64, expected: u64) {
    let mut w = writer.lock().await;
    if w.is_closed() || generation.load(Ordering::SeqCst) != expected {
        return;
    }
    for frame in frames {
        w.push_text(frame.as_bytes());
    }
    let _ = w.flush().await;
}

/// Answers a ping, or echoes the server's close (then nothing more is sent).
async fn send_control(writer: &SharedWriter, op: OpCode, payload: &[u8]) -> io::Result<()> {
    let mut w = writer.lock().await;
    if w.is_closed() {
        return Ok(());
    }
    w.push(op, payload);
    let r = w.flush().await;
    if op == OpCode::Close {
        w.set_closed();
    }
    r
}

async fn send_joins(writer: &SharedWriter, st: &ReaderState, sh: &Shared) -> io::Result<()> {
    if st.tracks.is_empty() {
        return Ok(());
    }
    let mut w = writer.lock().await;
    for t in &st.tracks {
        let presence = if sh.presence { r#","presence":true"# } else { "" };
        let frame = format!(r#"{{"type":"join","room":{}{presence}}}"#, sh.rooms_json[t.room]);
        w.push_text(frame.as_bytes());
    }
    w.flush().await
}

fn close_key(payload: &[u8]) -> String {
    if payload.len() >= 2 {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        let reason = String::from_utf8_lossy(&payload[2..]);
        if reason.is_empty() {
            format!("close {code}")
        } else {
            format!("close {code} ({reason})")
        }
    } else {
        "close (no code)".to_string()
    }
}

fn error_key(e: &ReadError) -> String {
    match e {
        ReadError::Eof => "eof without close frame".to_string(),
        ReadError::Io(io) => format!("io: {:?}", io.kind()),
        ReadError::Protocol(what) => format!("protocol: {what}"),
    }
}

impl ReaderState {
    /// A text frame received at `now` (Unix ns).
    fn on_text(&mut self, payload: &[u8], now: u64, sh: &Shared) {
        let Some(f) = parse(payload) else {
            sh.stats
                .issues()
                .errors
                .add("unparsable frame", || String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned());
            return;
        };
        match f.ty {
            "message" => self.on_message(&f, now, sh),
            "ack" => self.on_ack(&f, now, sh),
            "joined" => self.on_joined(&f, sh),
            "left" => self.on_left(&f, sh),
            "error" => self.on_error(&f, sh),
            "presence_state" | "presence_diff" => self.on_presence(&f, now, sh),
            _ => {}
        }
    }

    fn track(&self, room: Option<&str>, sh: &Shared) -> Option<usize> {
        let room = room?;
        self.tracks.iter().position(|t| sh.rooms[t.room] == room)
    }

    fn on_message(&mut self, f: &ServerFrame<'_>, now: u64, sh: &Shared) {
        let ti = self.track(f.room, sh);
        let check = match (ti, f.seq) {
            (Some(i), Some(seq)) => Some(self.tracks[i].seq.check(seq)),
            _ => None,
        };
        if let (Some(rec), Some(i), Some(seq), Some(m)) = (&sh.record, ti, f.seq, f.marker) {
            rec.message(now, self.id as u64, self.tracks[i].room as u64, seq, m.publisher, m.k);
        }
        if !sh.stats.counting() {
            return;
        }
        let mut s = sh.stats.shard(self.id);
        match check {
            Some(SeqCheck::Gap(n)) => {
                s.gaps += 1;
                s.gap_seqs += n;
            }
            Some(SeqCheck::Duplicate) => {
                s.duplicates += 1;
                return;
            }
            Some(SeqCheck::Reordered) => s.reorders += 1,
            _ => {}
        }
        match (f.marker, ti) {
            (Some(m), Some(i)) => {
                s.delivered += 1;
                s.delivered_room[self.tracks[i].room] += 1;
                let lat = now.saturating_sub(m.sched_ns).max(1);
                s.delivery_iv.saturating_record(lat);
                if m.sent_ns > 0 {
                    s.delivery_from_send.saturating_record(now.saturating_sub(m.sent_ns).max(1));
                }
            }
            _ => s.foreign += 1,
        }
    }

    fn on_ack(&mut self, f: &ServerFrame<'_>, now: u64, sh: &Shared) {
        let Some(send) = &self.send else { return };
        let Some(k) = f.reference.and_then(|r| r.parse::<u64>().ok()) else {
            return;
        };
        if let Some(rec) = &sh.record {
            let mut ev = Event::new("a", now, self.id as u64);
            ev.r = f.room.and_then(|r| sh.rooms.iter().position(|n| n == r)).map(|r| r as u64);
            (ev.s, ev.k) = (f.seq, Some(k));
            rec.event(&ev);
        }
        if !sh.stats.counting() || send.rooms.is_empty() {
            return;
        }
        let start = sh.send_start_ns.load(Ordering::Relaxed);
        let lat = now.saturating_sub(sh.scaled(&send.schedule).due(start, k)).max(1);
        let room = send.rooms[(k % send.rooms.len() as u64) as usize];
        sh.stats.acked.fetch_add(1, Ordering::Relaxed);
        sh.stats.acked_room[room].fetch_add(1, Ordering::Relaxed);
        let mut s = sh.stats.shard(self.id);
        s.ack_iv.saturating_record(lat);
    }

    /// Counts presence frames, and notes when this connection's view first
    /// shows every member its room will have.
    fn on_presence(&mut self, f: &ServerFrame<'_>, now: u64, sh: &Shared) {
        let stats = &sh.stats;
        stats.presence_frames.fetch_add(1, Ordering::Relaxed);
        if f.ty == "presence_state" {
            stats.presence_states.fetch_add(1, Ordering::Relaxed);
        }
        let Some(i) = self.track(f.room, sh) else { return };
        let expected = sh.room_members.get(self.tracks[i].room).copied().unwrap_or(0);
        if !self.presence_complete && expected > 0 && f.count == Some(expected) {
            self.presence_complete = true;
            stats.presence_complete.fetch_add(1, Ordering::Relaxed);
            stats.presence_complete_last_ns.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// The answer to a churn leave: rejoin at once with `since` = the last
    /// seq seen (every message delivered before the leave came before this).
    fn on_left(&mut self, f: &ServerFrame<'_>, sh: &Shared) {
        let Some(i) = self.track(f.room, sh) else { return };
        if let Some(rec) = &sh.record {
            let mut ev = Event::new("l", sh.clock.now_ns(), self.id as u64);
            ev.r = Some(self.tracks[i].room as u64);
            rec.event(&ev);
        }
        let t = &mut self.tracks[i];
        if t.join != JoinState::Joined {
            return;
        }
        t.join = JoinState::Rejoining;
        let frame = rejoin_frame(t, sh);
        self.outbox.push(frame);
    }

    /// `--reconnect`: the joins for the new connection: every room this
    /// member was in (or on its way back into), with `since` and `epoch`.
    fn rejoins(&mut self, sh: &Shared) -> Vec<String> {
        let mut frames = Vec::new();
        for t in &mut self.tracks {
            match t.join {
                JoinState::Joined | JoinState::Rejoining | JoinState::Resuming => {
                    t.join = JoinState::Resuming;
                    frames.push(rejoin_frame(t, sh));
                }
                JoinState::Pending | JoinState::Failed => {}
            }
        }
        if !frames.is_empty() {
            // No churn leave while the member is on its way back.
            self.churning.store(true, Ordering::SeqCst);
        }
        frames
    }

    fn on_joined(&mut self, f: &ServerFrame<'_>, sh: &Shared) {
        let Some(i) = self.track(f.room, sh) else {
            return;
        };
        let t = &mut self.tracks[i];
        let new_epoch = f.epoch.is_some_and(|e| t.epoch.as_deref() != Some(e));
        if let Some(rec) = &sh.record {
            let mut ev = Event::new("j", sh.clock.now_ns(), self.id as u64);
            (ev.r, ev.s, ev.ep, ev.rc) = (Some(t.room as u64), f.seq, f.epoch.map(str::to_string), f.recovered);
            if matches!(t.join, JoinState::Rejoining | JoinState::Resuming) {
                ev.since = Some(t.seq.last.unwrap_or(0));
            }
            ev.u = t.join == JoinState::Joined;
            rec.event(&ev);
        }
        if let Some(e) = f.epoch {
            t.epoch = Some(e.to_string());
        }
        if t.join == JoinState::Joined {
            // Unsolicited: the room started a new epoch (PROTOCOL.md
            // section 2); its messages follow from this seq.
            if new_epoch || f.recovered == Some(false) {
                sh.stats.epoch_changes.fetch_add(1, Ordering::Relaxed);
                t.seq.last = f.seq.or(t.seq.last);
            }
            return;
        }
        if t.join == JoinState::Resuming {
            // Back after a reconnect: as for a churn rejoin, the replay
            // came first; a `recovered: false` goes on from this seq.
            t.join = JoinState::Joined;
            sh.stats.resumed.fetch_add(1, Ordering::Relaxed);
            if f.recovered == Some(false) {
                sh.stats.resume_unrecovered.fetch_add(1, Ordering::Relaxed);
                t.seq.last = f.seq.or(t.seq.last);
            }
            if !self.tracks.iter().any(|t| t.join == JoinState::Resuming) {
                self.churning.store(false, Ordering::SeqCst);
            }
            return;
        }
        if t.join == JoinState::Rejoining {
            // The replay came before this `joined`; the seq check saw it.
            t.join = JoinState::Joined;
            sh.stats.churn_rejoins.fetch_add(1, Ordering::Relaxed);
            if f.recovered == Some(false) {
                // Nothing was replayed (history gone, or a new epoch whose
                // seqs have nothing to do with the old ones): go on from
                // the seq of this `joined`. What the member missed shows as
                // missing deliveries and as this count, not as a gap or a
                // reorder.
                sh.stats.churn_unrecovered.fetch_add(1, Ordering::Relaxed);
                t.seq.last = f.seq.or(t.seq.last);
            }
            self.churning.store(false, Ordering::SeqCst);
            return;
        }
        if t.join != JoinState::Pending {
            return;
        }
        t.join = JoinState::Joined;
        if let Some(seq) = f.seq {
            if t.seq.last.is_none_or(|l| l < seq) {
                t.seq.last = Some(seq);
            }
        }
        let room = t.room;
        self.pending -= 1;
        let stats = &sh.stats;
        stats.room_members[room].fetch_add(1, Ordering::Relaxed);
        stats.joined.fetch_add(1, Ordering::Relaxed);
        stats.join_pending.fetch_sub(1, Ordering::SeqCst);
    }

    fn on_error(&mut self, f: &ServerFrame<'_>, sh: &Shared) {
        let code = f.code.unwrap_or("unknown");
        let message = f.message.unwrap_or("");
        let send_ref = f.reference.and_then(|r| r.parse::<u64>().ok());
        let is_send = send_ref.is_some();
        if let Some(rec) = &sh.record {
            let mut ev = Event::new("x", sh.clock.now_ns(), self.id as u64);
            ev.k = send_ref;
            ev.r = f.room.and_then(|r| sh.rooms.iter().position(|n| n == r)).map(|r| r as u64);
            ev.code = Some(code.to_string());
            rec.event(&ev);
        }
        if !is_send && code != "not_joined" {
            // A rejoin (churn or reconnect) answered `unavailable` (Redis
            // away): send it again in a moment.
            let back = |t: &Track| matches!(t.join, JoinState::Rejoining | JoinState::Resuming);
            let named = f.reference.and_then(|r| r.strip_prefix("rejoin-")).and_then(|r| r.parse::<usize>().ok());
            let again = self
                .tracks
                .iter()
                .position(|t| back(t) && (named == Some(t.room) || Some(sh.rooms[t.room].as_str()) == f.room))
                .or_else(|| self.tracks.iter().position(back));
            if let (Some(i), "unavailable") = (again, code) {
                let frame = rejoin_frame(&self.tracks[i], sh);
                self.retry.push(frame);
                sh.stats.rejoin_retries.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let rejoin = self
                .tracks
                .iter()
                .position(|t| back(t) && (named == Some(t.room) || Some(sh.rooms[t.room].as_str()) == f.room))
                .or_else(|| self.tracks.iter().position(back));
            if let Some(i) = rejoin {
                // The rejoin was refused: this member is out of the room
                // from here on, and its missed messages count as missing.
                self.tracks[i].join = JoinState::Failed;
                self.churning.store(false, Ordering::SeqCst);
                sh.stats.churn_failed.fetch_add(1, Ordering::Relaxed);
                let room = &sh.rooms[self.tracks[i].room];
                sh.stats
                    .issues()
                    .join
                    .add(code, || format!("rejoining room {room:?} after a churn leave: {code}: {message}"));
                return;
            }
        }
        if self.pending > 0 && !is_send {
            // An error while joins are outstanding answers the oldest one.
            let i = self
                .tracks
                .iter()
                .position(|t| t.join == JoinState::Pending && Some(sh.rooms[t.room].as_str()) == f.room)
                .or_else(|| self.tracks.iter().position(|t| t.join == JoinState::Pending));
            if let (Some(i), "unavailable", Some(_)) = (i, code, &sh.redial) {
                // With --reconnect (a run where backends fail), a first
                // join answered `unavailable` is tried again too.
                let presence = if sh.presence { r#","presence":true"# } else { "" };
                let room = &sh.rooms_json[self.tracks[i].room];
                self.retry.push(format!(r#"{{"type":"join","room":{room}{presence}}}"#));
                sh.stats.rejoin_retries.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Some(i) = i {
                self.tracks[i].join = JoinState::Failed;
                self.pending -= 1;
                if !self.tracks.iter().any(|t| matches!(t.join, JoinState::Joined | JoinState::Pending)) {
                    // In no room: nothing for the churn driver to leave.
                    self.churning.store(true, Ordering::SeqCst);
                }
                sh.stats.join_failed.fetch_add(1, Ordering::Relaxed);
                sh.stats.join_pending.fetch_sub(1, Ordering::SeqCst);
                let room = &sh.rooms[self.tracks[i].room];
                sh.stats.issues().join.add(code, || format!("joining room {room:?}: {code}: {message}"));
                return;
            }
        }
        sh.stats.issues().errors.add(code, || format!("{code}: {message}"));
    }

    fn on_end(&mut self, end: &str, sh: &Shared) {
        let stats = &sh.stats;
        if let (Some(rec), false) = (&sh.record, stats.closing.load(Ordering::Relaxed)) {
            let mut ev = Event::new("z", sh.clock.now_ns(), self.id as u64);
            ev.why = Some(end.to_string());
            rec.event(&ev);
        }
        stats.up.fetch_sub(1, Ordering::Relaxed);
        if self.pending > 0 {
            let n = self.pending;
            self.pending = 0;
            stats.join_failed.fetch_add(n as u64, Ordering::Relaxed);
            stats.join_pending.fetch_sub(n as i64, Ordering::SeqCst);
            for _ in 0..n {
                stats.issues().join.add("connection ended", || format!("connection ended before joined: {end}"));
            }
        }
        if !stats.closing.load(Ordering::Relaxed) {
            stats.issues().closes.add(end, || end.to_string());
        }
    }
}

/// A join with `since` = the last seq the member saw and that seq's epoch,
/// and `ref` = `rejoin-<room index>` (an error names the room it answers).
fn rejoin_frame(t: &Track, sh: &Shared) -> String {
    let presence = if sh.presence { r#","presence":true"# } else { "" };
    let since = t.seq.last.unwrap_or(0);
    let epoch = match &t.epoch {
        Some(e) => format!(r#","epoch":"{e}""#),
        None => String::new(),
    };
    format!(
        r#"{{"type":"join","room":{},"since":{since}{epoch}{presence},"ref":"rejoin-{}"}}"#,
        sh.rooms_json[t.room], t.room
    )
}

async fn send_loop(
    id: usize,
    mut ticks: UnboundedReceiver<u64>,
    writer: SharedWriter,
    send: Arc<SendSpec>,
    sh: Arc<Shared>,
) {
    let mut msg = Vec::with_capacity(send.payload + 160);
    let n_rooms = send.rooms.len() as u64;
    if n_rooms == 0 {
        return;
    }
    while let Some(first) = ticks.recv().await {
        let start = sh.send_start_ns.load(Ordering::Relaxed);
        let schedule = sh.scaled(&send.schedule);
        let mut w = writer.lock().await;
        let mut n = 0u64;
        let mut next = Some(first);
        while let Some(k) = next {
            let room = send.rooms[(k % n_rooms) as usize];
            build_send(&mut msg, &sh.rooms_json[room], k, schedule.due(start, k), sh.clock.now_ns(), id, send.payload);
            w.push_text(&msg);
            n += 1;
            next = if n < MAX_BATCH { ticks.try_recv().ok() } else { None };
        }
        let r = w.flush().await;
        drop(w);
        if r.is_err() {
            if sh.redial.is_some() {
                // Lost with the connection (never acked); the reader is
                // reconnecting, later messages go on the new one.
                continue;
            }
            // The reader reports how the connection ended.
            break;
        }
        sh.stats.sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// Words the padding is made of: chat-like text, so that compression sees
/// what it would in a real room rather than a run of one letter.
const PAD_WORDS: [&str; 32] = [
    "the", "meeting", "is", "moved", "to", "three", "see", "you", "there", "thanks", "for", "the", "update", "can",
    "we", "ship", "it", "today", "I", "think", "so", "deploy", "looks", "good", "on", "staging", "lunch", "later",
    "sounds", "great", "sorry", "late",
];

/// A `send` frame whose body is `payload` bytes long (or the shortest body
/// holding the marker): `{"t":sched,"s":sent,"p":publisher,"k":k,"pad":"words.."}`.
pub fn build_send(
    out: &mut Vec<u8>,
    room_json: &str,
    k: u64,
    sched_ns: u64,
    sent_ns: u64,
    publisher: usize,
    payload: usize,
) {
    use std::io::Write;
    out.clear();
    out.extend_from_slice(br#"{"type":"send","room":"#);
    out.extend_from_slice(room_json.as_bytes());
    let _ = write!(out, r#","ref":"{k}","body":"#);
    let body_start = out.len();
    let _ = write!(out, r#"{{"t":{sched_ns},"s":{sent_ns},"p":{publisher},"k":{k},"pad":""#);
    let pad = payload.saturating_sub(out.len() - body_start + 2);
    let end = out.len() + pad;
    let mut x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(PAD_WORDS[(x % PAD_WORDS.len() as u64) as usize].as_bytes());
        out.push(b' ');
    }
    out.truncate(end);
    out.extend_from_slice(br#""}}"#);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_frames_have_the_asked_body_size() {
        let mut out = Vec::new();
        build_send(&mut out, "\"lg-1\"", 42, 1_700_000_000_000_000_000, 1_700_000_000_000_000_123, 7, 200);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "send");
        assert_eq!(v["room"], "lg-1");
        assert_eq!(v["ref"], "42");
        assert_eq!(serde_json::to_string(&v["body"]).unwrap().len(), 200);
        assert_eq!(v["body"]["t"], 1_700_000_000_000_000_000u64);
        // The server echoes the body; our parser finds the marker in it.
        let echoed = format!(r#"{{"type":"message","room":"lg-1","seq":1,"from":"lg-7","ts":1,"body":{}}}"#, v["body"]);
        let f = parse(echoed.as_bytes()).unwrap();
        let m = f.marker.unwrap();
        assert_eq!((m.k, m.publisher, m.sent_ns), (42, 7, 1_700_000_000_000_000_123));
        // Too small a payload still gives a valid body.
        build_send(&mut out, "\"r\"", 1, 2, 3, 4, 5);
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
    }

    fn state(sh: &Shared, joins: Vec<usize>, send: Option<SendSpec>) -> ReaderState {
        sh.stats.join_pending.fetch_add(joins.len() as i64, Ordering::SeqCst);
        ReaderState {
            id: 0,
            pending: joins.len(),
            tracks: joins
                .into_iter()
                .map(|room| Track { room, seq: SeqTrack::default(), join: JoinState::Pending, epoch: None })
                .collect(),
            send: send.map(Arc::new),
            presence_complete: false,
            churning: Arc::new(AtomicBool::new(false)),
            outbox: Vec::new(),
            retry: Vec::new(),
            redials: 0,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    fn msg(room: &str, seq: u64, k: u64) -> Vec<u8> {
        format!(
            r#"{{"type":"message","room":"{room}","seq":{seq},"from":"lg-9","ts":1,"body":{{"t":1,"s":2,"p":9,"k":{k}}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn reader_checks_seqs_and_counts_deliveries() {
        let sh = Shared::new(Stats::new(2, 1).unwrap(), Clock::new(), vec!["a".into(), "b".into()]);
        sh.stats.counting.store(true, Ordering::SeqCst);
        let mut st = state(&sh, vec![0, 1], None);
        st.on_text(br#"{"type":"joined","room":"a","seq":10,"epoch":"e"}"#, sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"error","code":"forbidden","message":"no"}"#, sh.clock.now_ns(), &sh);
        assert_eq!(st.pending, 0);
        assert_eq!(sh.stats.join_pending.load(Ordering::SeqCst), 0);
        assert_eq!(sh.stats.joined.load(Ordering::SeqCst), 1);
        assert_eq!(sh.stats.join_failed.load(Ordering::SeqCst), 1);
        assert_eq!(sh.stats.issues().join.0["forbidden"].0, 1);
        for (seq, k) in [(11, 0), (12, 1), (15, 2), (15, 2), (13, 3), (16, 4)] {
            st.on_text(&msg("a", seq, k), sh.clock.now_ns(), &sh);
        }
        st.on_text(&msg("zzz", 1, 5), sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"message","room":"a","seq":17,"body":"hello"}"#, sh.clock.now_ns(), &sh);
        let m = sh.stats.merged();
        assert_eq!((m.gaps, m.gap_seqs, m.duplicates, m.reorders), (1, 2, 1, 1));
        // 11, 12, 15, 13, 16 delivered; the duplicate 15 is not.
        assert_eq!(m.delivered, 5);
        assert_eq!(m.delivered_room, vec![5, 0]);
        assert_eq!(m.foreign, 2);
        assert_eq!(m.delivery.len(), 5);
        assert_eq!(sh.stats.room_members[0].load(Ordering::SeqCst), 1);
        st.on_end("close 1013", &sh);
        assert_eq!(sh.stats.issues().closes.0["close 1013"].0, 1);
    }

    #[test]
    fn reader_times_acks_and_counts_send_errors() {
        let sh = Shared::new(Stats::new(2, 1).unwrap(), Clock::new(), vec!["a".into(), "b".into()]);
        sh.stats.counting.store(true, Ordering::SeqCst);
        sh.send_start_ns.store(sh.clock.now_ns(), Ordering::SeqCst);
        let send =
            SendSpec { rooms: vec![0, 1], schedule: Schedule { offset_ns: 0, interval_ns: 1000.0 }, payload: 10 };
        let mut st = state(&sh, vec![], Some(send));
        st.on_text(br#"{"type":"ack","ref":"0","room":"a","seq":1}"#, sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"ack","ref":"1","room":"b","seq":1}"#, sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"ack","ref":"3","room":"b","seq":2}"#, sh.clock.now_ns(), &sh);
        st.on_text(
            br#"{"type":"error","code":"rate_limited","message":"slow down","ref":"2"}"#,
            sh.clock.now_ns(),
            &sh,
        );
        assert_eq!(sh.stats.acked.load(Ordering::SeqCst), 3);
        assert_eq!(sh.stats.acked_room[1].load(Ordering::SeqCst), 2);
        assert_eq!(sh.stats.issues().errors.0["rate_limited"].0, 1);
        assert_eq!(sh.stats.merged().ack.len(), 3);
    }

    /// A churn leave: on `left` the reader rejoins with `since` = the last
    /// seq seen and its epoch; the replay and live messages after it pass
    /// the seq check without gap or duplicate, and the rejoin is counted.
    #[test]
    fn churn_rejoins_with_since_and_keeps_the_seq_check() {
        let mut sh = Shared::new(Stats::new(1, 1).unwrap(), Clock::new(), vec!["a".into()]);
        sh.presence = true;
        sh.stats.counting.store(true, Ordering::SeqCst);
        let mut st = state(&sh, vec![0], None);
        st.on_text(br#"{"type":"joined","room":"a","seq":10,"epoch":"e1"}"#, sh.clock.now_ns(), &sh);
        st.on_text(&msg("a", 11, 0), sh.clock.now_ns(), &sh);
        st.churning.store(true, Ordering::SeqCst);
        // Delivered before the server handled the leave: still counted.
        st.on_text(&msg("a", 12, 1), sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"left","room":"a"}"#, sh.clock.now_ns(), &sh);
        assert_eq!(
            st.outbox,
            vec![r#"{"type":"join","room":"a","since":12,"epoch":"e1","presence":true,"ref":"rejoin-0"}"#.to_string()]
        );
        // A second `left` (not ours) sends nothing more.
        st.on_text(br#"{"type":"left","room":"a"}"#, sh.clock.now_ns(), &sh);
        assert_eq!(st.outbox.len(), 1);
        // The replay, then `joined`, then live messages.
        st.on_text(&msg("a", 13, 2), sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"joined","room":"a","seq":13,"epoch":"e1","recovered":true}"#, sh.clock.now_ns(), &sh);
        st.on_text(&msg("a", 14, 3), sh.clock.now_ns(), &sh);
        assert!(!st.churning.load(Ordering::SeqCst), "the member can churn again");
        assert_eq!(sh.stats.churn_rejoins.load(Ordering::SeqCst), 1);
        assert_eq!(sh.stats.churn_unrecovered.load(Ordering::SeqCst), 0);
        let m = sh.stats.merged();
        assert_eq!((m.gaps, m.duplicates, m.reorders, m.delivered), (0, 0, 0, 4));
        // Members are counted once, however often they rejoin.
        assert_eq!(sh.stats.room_members[0].load(Ordering::SeqCst), 1);
        assert_eq!(sh.stats.joined.load(Ordering::SeqCst), 1);

        // A rejoin the server could not replay is counted; the seqs go on
        // from its `joined` (a new epoch's seqs may be lower).
        st.outbox.clear();
        st.on_text(br#"{"type":"left","room":"a"}"#, sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"joined","room":"a","seq":3,"epoch":"e2","recovered":false}"#, sh.clock.now_ns(), &sh);
        st.on_text(&msg("a", 4, 4), sh.clock.now_ns(), &sh);
        assert_eq!(sh.stats.churn_unrecovered.load(Ordering::SeqCst), 1);
        let m = sh.stats.merged();
        assert_eq!((m.gaps, m.reorders), (0, 0));
        st.outbox.clear();

        // A refused rejoin: the track is out of the room, counted as failed.
        st.on_text(br#"{"type":"left","room":"a"}"#, sh.clock.now_ns(), &sh);
        assert!(st.outbox[0].contains(r#""since":4,"epoch":"e2""#), "{:?}", st.outbox);
        st.churning.store(true, Ordering::SeqCst);
        st.on_text(br#"{"type":"error","code":"forbidden","message":"no"}"#, sh.clock.now_ns(), &sh);
        assert_eq!(sh.stats.churn_failed.load(Ordering::SeqCst), 1);
        assert!(!st.churning.load(Ordering::SeqCst));
        assert_eq!(sh.stats.issues().join.0["forbidden"].0, 1);
    }

    /// `--reconnect`: after the connection is opened again, the member
    /// rejoins with since/epoch; the replay and live messages pass the seq
    /// check; a rejoin answered `unavailable` is queued to be sent again;
    /// an unsolicited `joined` (new epoch) restarts the seq check; and
    /// everything lands in the record.
    #[test]
    fn reconnect_rejoins_retries_and_follows_a_new_epoch() {
        let dir = std::env::temp_dir().join(format!("loadgen-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec.jsonl");
        let mut sh = Shared::new(Stats::new(2, 1).unwrap(), Clock::new(), vec!["a".into(), "b".into()]);
        sh.record = Some(Recorder::create(&path).unwrap());
        sh.stats.counting.store(true, Ordering::SeqCst);
        let mut st = state(&sh, vec![0, 1], None);
        st.on_text(br#"{"type":"joined","room":"a","seq":10,"epoch":"e1"}"#, sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"joined","room":"b","seq":0,"epoch":"f1"}"#, sh.clock.now_ns(), &sh);
        st.on_text(&msg("a", 11, 0), sh.clock.now_ns(), &sh);
        st.on_end("eof without close frame", &sh);
        let frames = st.rejoins(&sh);
        assert_eq!(
            frames,
            vec![
                r#"{"type":"join","room":"a","since":11,"epoch":"e1","ref":"rejoin-0"}"#.to_string(),
                r#"{"type":"join","room":"b","since":0,"epoch":"f1","ref":"rejoin-1"}"#.to_string()
            ]
        );
        assert!(st.churning.load(Ordering::SeqCst), "no churn while on the way back");
        // Room a: the replay, then joined. Room b: Redis is away.
        st.on_text(&msg("a", 12, 1), sh.clock.now_ns(), &sh);
        st.on_text(br#"{"type":"joined","room":"a","seq":12,"epoch":"e1","recovered":true}"#, sh.clock.now_ns(), &sh);
        st.on_text(
            br#"{"type":"error","code":"unavailable","message":"redis","ref":"rejoin-1"}"#,
            sh.clock.now_ns(),
            &sh,
        );
        assert_eq!(st.retry, vec![r#"{"type":"join","room":"b","since":0,"epoch":"f1","ref":"rejoin-1"}"#.to_string()]);
        assert!(st.churning.load(Ordering::SeqCst));
        st.on_text(br#"{"type":"joined","room":"b","seq":0,"epoch":"f1","recovered":true}"#, sh.clock.now_ns(), &sh);
        assert!(!st.churning.load(Ordering::SeqCst));
        assert_eq!(sh.stats.resumed.load(Ordering::SeqCst), 2);
        assert_eq!(sh.stats.rejoin_retries.load(Ordering::SeqCst), 1);
        // Redis lost its data: an unsolicited joined, then seqs from 1.
        st.on_text(br#"{"type":"joined","room":"a","seq":0,"epoch":"e2","recovered":false}"#, sh.clock.now_ns(), &sh);
        st.on_text(&msg("a", 1, 2), sh.clock.now_ns(), &sh);
        let m = sh.stats.merged();
        assert_eq!((m.gaps, m.duplicates, m.reorders, m.delivered), (0, 0, 0, 3));
        assert_eq!(sh.stats.epoch_changes.load(Ordering::SeqCst), 1);
        sh.record.as_ref().unwrap().flush().unwrap();
        let evs = crate::record::read(&path).unwrap();
        let kinds: Vec<&str> = evs.iter().map(|e| e.e.as_str()).collect();
        assert_eq!(kinds, vec!["j", "j", "m", "z", "m", "j", "x", "j", "j", "m"]);
        assert_eq!(evs[3].why.as_deref(), Some("eof without close frame"));
        assert_eq!((evs[5].rc, evs[5].since.is_some()), (Some(true), true));
        assert_eq!((evs[6].code.as_deref(), evs[6].k), (Some("unavailable"), None));
        assert!(evs[8].u && evs[8].ep.as_deref() == Some("e2"));
        assert_eq!((evs[9].r, evs[9].s, evs[9].p, evs[9].k), (Some(0), Some(1), Some(9), Some(2)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn close_keys() {
        assert_eq!(close_key(&[0x03, 0xf5]), "close 1013");
        let mut p = vec![0x03, 0xf0];
        p.extend_from_slice(b"token expired");
        assert_eq!(close_key(&p), "close 1008 (token expired)");
        assert_eq!(close_key(&[]), "close (no code)");
    }
}
