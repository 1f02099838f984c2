//! One room's presence as this node sees it: who is present, which local
//! connections make them so, and, only while some local connection
//! subscribes, what changed since the subscribers last heard.
//!
//! Most rooms have no presence subscriber, so everything diffs need sits
//! behind one `Option<Box<_>>`: such a room pays two empty maps and a
//! pointer. Diffs are computed from a log of the users who came or went
//! since the last flush; a user's entries in it alternate (came, went,
//! came...), so the first entry after any point says what that user was
//! before it. That gives each subscriber the net change since the state or
//! diff it last received, including one that subscribed mid-interval.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::conn::outbox::{PushError, Pushed};
use crate::conn::Connection;
use crate::metrics::Metrics;
use crate::protocol::outbound::{self, PresenceView, PresentUser};
use crate::room::RoomName;

/// The most users a `presence` answer or state lists, and the largest change
/// sent as a diff (a larger one goes out as a fresh state).
pub const MAX_LISTED: usize = 1000;

/// This node's users and their connections here, as a cluster node writes them.
pub(super) type LocalUsers = Vec<(Arc<str>, u32)>;

/// Diffs go out at most this often per room.
pub const DIFF_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(super) struct RoomPresence {
    /// Present users and their joined connections (in a cluster, the sum
    /// over every node), sorted by `sub` as answers list them.
    users: BTreeMap<Arc<str>, u32>,
    /// This node's joined connections and the user each one is.
    conns: HashMap<u64, Arc<str>>,
    /// Present only while a local connection subscribes.
    live: Option<Box<Live>>,
    /// What the room's sync task has to do.
    pub(super) sync: SyncState,
    /// Set when the room left the map; whoever raced with that looks again.
    pub(super) removed: bool,
}

/// The room's one sync task: whether it runs, and what it has to do.
#[derive(Default)]
pub(super) struct SyncState {
    /// The task is on its way.
    scheduled: bool,
    /// Cluster: this node's contribution must be written to Redis.
    pub(super) local_dirty: bool,
    /// Cluster: the other nodes' contributions must be read again.
    pub(super) remote_due: bool,
    last_run: Option<Instant>,
}

struct Live {
    subscribers: Vec<Subscriber>,
    /// The users who came (`true`) or went since the last flush, in order.
    log: Vec<(Arc<str>, bool)>,
    /// Cluster: the other nodes' users and connections, as last read.
    remote: HashMap<Arc<str>, u32>,
}

impl Live {
    fn new() -> Box<Self> {
        Box::new(Live { subscribers: Vec::new(), log: Vec::new(), remote: HashMap::new() })
    }
}

struct Subscriber {
    conn: Arc<Connection>,
    /// The length of `log` when this subscriber got its state: the entries
    /// before it are already in what it holds.
    from: usize,
}

/// What a flush sends to the subscribers that share a starting point.
enum Change {
    None,
    Diff(Bytes),
    State,
}

impl RoomPresence {
    /// Counts a local connection of `sub` (once however often it joins).
    pub(super) fn add_conn(&mut self, id: u64, sub: &str) {
        if self.conns.contains_key(&id) {
            return;
        }
        let sub = match self.users.get_key_value(sub) {
            Some((key, _)) => key.clone(),
            None => Arc::from(sub),
        };
        self.conns.insert(id, sub.clone());
        self.add_user_conns(&sub, 1);
    }

    /// Forgets a local connection; whether it was counted here.
    pub(super) fn remove_conn(&mut self, id: u64) -> bool {
        let Some(sub) = self.conns.remove(&id) else { return false };
        self.remove_user_conns(&sub, 1);
        true
    }

    fn add_user_conns(&mut self, sub: &Arc<str>, n: u32) {
        let conns = self.users.entry(sub.clone()).or_insert(0);
        *conns += n;
        if *conns == n {
            self.record(sub, true);
        }
    }

    fn remove_user_conns(&mut self, sub: &Arc<str>, n: u32) {
        let Some(conns) = self.users.get_mut(sub) else { return };
        *conns = conns.saturating_sub(n);
        if *conns == 0 {
            self.users.remove(sub);
            self.record(sub, false);
        }
    }

    fn record(&mut self, sub: &Arc<str>, present: bool) {
        if let Some(live) = &mut self.live {
            live.log.push((sub.clone(), present));
        }
    }

    /// Subscribes `conn` (again) and queues its state; returns whether it
    /// is a new subscriber and what the push said. In a cluster, the first
    /// subscriber brings the other nodes' users, read just before.
    pub(super) fn subscribe(
        &mut self,
        room: &RoomName,
        conn: &Arc<Connection>,
        remote: Option<HashMap<String, u32>>,
    ) -> (bool, Result<Pushed, PushError>) {
        if self.live.is_none() {
            self.live = Some(Live::new());
            if let Some(remote) = remote {
                self.set_remote(remote);
            }
        }
        let state = outbound::presence_state(room, self.view());
        let Some(live) = self.live.as_mut() else { return (false, Err(PushError::Closed)) };
        let from = live.log.len();
        let new = match live.subscribers.iter_mut().find(|s| s.conn.id == conn.id) {
            Some(subscriber) => {
                subscriber.from = from;
                false
            }
            None => {
                live.subscribers.push(Subscriber { conn: conn.clone(), from });
                true
            }
        };
        (new, conn.queue(conn.own_frame(state)))
    }

    /// Stops sending presence frames to `id`; whether it was subscribed.
    pub(super) fn unsubscribe(&mut self, id: u64) -> bool {
        let Some(live) = &mut self.live else { return false };
        let before = live.subscribers.len();
        live.subscribers.retain(|s| s.conn.id != id);
        let was = live.subscribers.len() != before;
        if live.subscribers.is_empty() {
            // Nobody here needs the other nodes' users any more.
            let remote = std::mem::take(&mut live.remote);
            self.live = None;
            for (sub, conns) in remote {
                self.remove_user_conns(&sub, conns);
            }
        }
        was
    }

    /// Cluster: whether some local connection subscribes, so the other
    /// nodes' contributions are worth reading.
    pub(super) fn wants_remote(&self) -> bool {
        self.live.is_some()
    }

    /// Whether the sync task has anything to do.
    fn has_work(&self) -> bool {
        self.sync.local_dirty || self.sync.remote_due || self.live.as_ref().is_some_and(|l| !l.log.is_empty())
    }

    /// When the sync task should run, if it has work and is not on its way
    /// already; the caller starts it.
    pub(super) fn sync_due(&mut self) -> Option<Instant> {
        if self.sync.scheduled || !self.has_work() {
            return None;
        }
        self.sync.scheduled = true;
        Some(self.next_run())
    }

    /// At the end of a sync task's round: when to run again, or `None`
    /// (and the task ends) when nothing is left to do.
    pub(super) fn sync_again(&mut self) -> Option<Instant> {
        if !self.has_work() {
            self.sync.scheduled = false;
            return None;
        }
        Some(self.next_run())
    }

    /// Rounds run at most every [`DIFF_INTERVAL`].
    fn next_run(&self) -> Instant {
        let now = Instant::now();
        self.sync.last_run.map_or(now, |last| (last + DIFF_INTERVAL).max(now))
    }

    /// The start of a sync task's round: what it has to write (this node's
    /// users and connections) and whether to read the other nodes.
    pub(super) fn start_round(&mut self) -> (Option<LocalUsers>, bool) {
        self.sync.last_run = Some(Instant::now());
        let local = std::mem::take(&mut self.sync.local_dirty).then(|| self.local_users());
        let remote = std::mem::take(&mut self.sync.remote_due) && self.live.is_some();
        (local, remote)
    }

    /// This node's users and their connections here.
    pub(super) fn local_users(&self) -> LocalUsers {
        let mut counts: HashMap<&Arc<str>, u32> = HashMap::new();
        for sub in self.conns.values() {
            *counts.entry(sub).or_insert(0) += 1;
        }
        counts.into_iter().map(|(sub, n)| (sub.clone(), n)).collect()
    }

    /// Cluster: replaces the other nodes' contributions with what was just
    /// read; users who came or went through it go into the diffs.
    pub(super) fn set_remote(&mut self, fresh: HashMap<String, u32>) {
        let Some(live) = &mut self.live else { return };
        let old = std::mem::take(&mut live.remote);
        let mut remote = HashMap::with_capacity(fresh.len());
        for (sub, conns) in &old {
            let now = fresh.get(&**sub).copied().unwrap_or(0);
            if now < *conns {
                self.remove_user_conns(sub, conns - now);
            }
        }
        for (sub, conns) in fresh {
            let sub = match self.users.get_key_value(sub.as_str()) {
                Some((key, _)) => key.clone(),
                None => Arc::from(sub),
            };
            let before = old.get(&sub).copied().unwrap_or(0);
            if conns > before {
                self.add_user_conns(&sub, conns - before);
            }
            remote.insert(sub, conns);
        }
        if let Some(live) = &mut self.live {
            live.remote = remote;
        }
    }

    /// Sends every subscriber the net change since what it last received,
    /// as a diff, or as a state when more than [`MAX_LISTED`] users changed.
    pub(super) fn flush(&mut self, room: &RoomName, metrics: &Metrics, to_flush: &mut Vec<Arc<Connection>>) {
        let Some(mut live) = self.live.take() else { return };
        let log = std::mem::take(&mut live.log);
        // Most subscribers start at 0; those that joined since the last
        // flush each have their own starting point.
        let mut changes: HashMap<usize, Change> = HashMap::new();
        let mut state: Option<Bytes> = None;
        // The compressed twin of each frame, made once for every subscriber
        // that negotiated compression (keyed like `changes`; `usize::MAX`
        // for the state).
        let mut deflated: HashMap<usize, Option<Option<Bytes>>> = HashMap::new();
        for subscriber in &mut live.subscribers {
            let key = subscriber.from;
            let change = changes.entry(subscriber.from).or_insert_with(|| self.change(room, &log[subscriber.from..]));
            subscriber.from = 0;
            let frame = match change {
                Change::None => continue,
                Change::Diff(frame) => {
                    metrics.presence_diffs.inc();
                    subscriber.conn.shared_frame(frame, deflated.entry(key).or_default())
                }
                Change::State => {
                    metrics.presence_states.inc();
                    let state = state.get_or_insert_with(|| outbound::presence_state(room, self.view()));
                    subscriber.conn.shared_frame(state, deflated.entry(usize::MAX).or_default())
                }
            };
            match subscriber.conn.queue(frame) {
                Ok(Pushed::FlushNeeded) => to_flush.push(subscriber.conn.clone()),
                Ok(Pushed::Queued) | Err(PushError::Closed) => {}
                Err(PushError::Full) => {
                    metrics.slow_consumers.inc();
                }
            }
        }
        self.live = Some(live);
    }

    fn change(&self, room: &RoomName, log: &[(Arc<str>, bool)]) -> Change {
        let (joins, leaves) = net_change(log, |sub| self.users.contains_key(sub));
        if joins.is_empty() && leaves.is_empty() {
            Change::None
        } else if joins.len() + leaves.len() > MAX_LISTED {
            Change::State
        } else {
            Change::Diff(outbound::presence_diff(room, joins.into_iter(), leaves.into_iter(), self.users.len()))
        }
    }

    /// The exact count and the first [`MAX_LISTED`] users by `sub`.
    pub(super) fn view(&self) -> PresenceView<impl Iterator<Item = PresentUser<'_>>> {
        let members = self.users.iter().take(MAX_LISTED).map(|(sub, conns)| PresentUser { sub, conns: *conns });
        PresenceView::new(self.users.len(), members, self.users.len() > MAX_LISTED)
    }

    /// Nothing left worth keeping: no local connection, no subscriber, no user.
    pub(super) fn is_idle(&self) -> bool {
        self.conns.is_empty() && self.live.is_none() && self.users.is_empty()
    }
}

/// The users whose presence differs between the start of `log` and now
/// (`present`), sorted: those who came and those who went.
fn net_change(log: &[(Arc<str>, bool)], present: impl Fn(&str) -> bool) -> (Vec<&str>, Vec<&str>) {
    let mut first: HashMap<&str, bool> = HashMap::new();
    for (sub, came) in log {
        first.entry(sub).or_insert(*came);
    }
    let mut joins = Vec::new();
    let mut leaves = Vec::new();
    for (sub, came) in first {
        // A user's entries alternate: one who first came was absent before.
        let was = !came;
        match (was, present(sub)) {
            (false, true) => joins.push(sub),
            (true, false) => leaves.push(sub),
            _ => {}
        }
    }
    joins.sort_unstable();
    leaves.sort_unstable();
    (joins, leaves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn log(entries: &[(&str, bool)]) -> Vec<(Arc<str>, bool)> {
        entries.iter().map(|(s, p)| (Arc::from(*s), *p)).collect()
    }

    #[test]
    fn net_change_drops_what_came_and_went() {
        let log = log(&[("a", true), ("b", false), ("a", false), ("c", true), ("b", true), ("d", true)]);
        let now: BTreeSet<&str> = ["b", "c", "d", "x"].into();
        let (joins, leaves) = net_change(&log, |s| now.contains(s));
        assert_eq!(joins, ["c", "d"]);
        assert!(leaves.is_empty());
        let (joins, leaves) = net_change(&log[2..], |s| now.contains(s));
        assert_eq!(joins, ["b", "c", "d"]);
        assert_eq!(leaves, ["a"]);
    }

    #[test]
    fn counts_users_not_connections() {
        let mut room = RoomPresence { live: None, ..Default::default() };
        room.add_conn(1, "alice");
        room.add_conn(2, "alice");
        room.add_conn(2, "alice");
        room.add_conn(3, "bob");
        assert_eq!(room.users.len(), 2);
        assert_eq!(room.users.get("alice"), Some(&2));
        assert!(room.remove_conn(1));
        assert!(!room.remove_conn(1));
        assert_eq!(room.users.get("alice"), Some(&1));
        room.remove_conn(2);
        room.remove_conn(3);
        assert!(room.is_idle());
    }

    #[test]
    fn a_change_of_more_than_a_thousand_users_is_a_state() {
        let room_name = RoomName::parse("r").unwrap();
        let mut room = RoomPresence { live: Some(Live::new()), ..Default::default() };
        for id in 0..=MAX_LISTED as u64 {
            room.add_conn(id, &format!("u{id}"));
        }
        let log = room.live.as_ref().unwrap().log.clone();
        assert_eq!(log.len(), MAX_LISTED + 1);
        assert!(matches!(room.change(&room_name, &log), Change::State));
        assert!(matches!(room.change(&room_name, &log[1..]), Change::Diff(_)));
        assert!(matches!(room.change(&room_name, &[]), Change::None));
        assert!(room.sync_due().is_some());
        assert!(room.sync_due().is_none(), "one sync task at a time");
    }

    #[test]
    fn a_room_without_subscribers_stays_small() {
        // Two empty maps, the pointer to the diff state, and a flag.
        assert!(std::mem::size_of::<RoomPresence>() <= 112, "{}", std::mem::size_of::<RoomPresence>());
    }
}
