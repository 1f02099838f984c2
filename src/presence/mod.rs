//! Presence (PROTOCOL.md section 8): who is in a room, counted by user
//! (`sub`), and `presence_state` / `presence_diff` frames for connections
//! that joined with `"presence": true`.
//!
//! Presence has its own sharded map rather than living in the registry's
//! rooms: the publish path never looks at it (a message costs nothing more
//! in a room with presence), and joins and leaves, which do change it, are
//! rare next to messages. Each room has its own lock, held only for map
//! updates and for queueing frames, never across an `.await`. Changes are
//! batched: the first one after a quiet period starts the room's one sync
//! task, which runs at most every [`DIFF_INTERVAL`]: in a cluster it writes
//! this node's contribution to Redis and reads the other nodes' (see
//! [`cluster`]), then it sends every subscriber the net change since what
//! it last received. On a Redis Cluster, a node hears the others' writes
//! only for the rooms it has presence subscribers in: the room's first
//! subscriber here subscribes the node to the room's shard channel, its
//! last one unsubscribes it.

mod cluster;
mod room;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::redis::ChannelEvent;
use crate::conn::outbox::{PushError, Pushed};
use crate::conn::{flush_all, Connection};
use crate::metrics::Metrics;
use crate::protocol::outbound::{self, PresenceView, PresentUser};
use crate::room::RoomName;
pub use cluster::Cluster;
use room::RoomPresence;
pub use room::{DIFF_INTERVAL, MAX_LISTED};

type RoomCell = Arc<Mutex<RoomPresence>>;
type Rooms = Arc<DashMap<RoomName, RoomCell>>;

/// Redis did not answer a presence read.
#[derive(Debug, thiserror::Error)]
#[error("redis is unavailable: {0}")]
pub struct PresenceError(String);

pub struct Presence {
    rooms: Rooms,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<Cluster>>,
    /// On a Redis Cluster: tells the listener which rooms' notices to hear.
    follow: Option<mpsc::UnboundedSender<Follow>>,
}

/// A room whose notices this node starts or stops hearing (Redis Cluster).
enum Follow {
    Start(RoomName),
    Stop(RoomName),
}

impl Presence {
    /// A single node's presence.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { rooms: Arc::default(), metrics, cluster: None, follow: None }
    }

    /// A cluster node's presence: starts the heartbeat and the listener for
    /// other nodes' notices, which run until `shutdown`.
    pub fn clustered(metrics: Arc<Metrics>, cluster: Cluster, shutdown: CancellationToken) -> Self {
        let sharded = cluster.is_sharded();
        let mut presence = Self { rooms: Arc::default(), metrics, cluster: Some(Arc::new(cluster)), follow: None };
        tokio::spawn(presence.handle().heartbeat(shutdown.clone()));
        if sharded {
            let (follow, followed) = mpsc::unbounded_channel();
            presence.follow = Some(follow);
            tokio::spawn(presence.handle().listen_sharded(followed, shutdown));
        } else {
            tokio::spawn(presence.handle().listen(shutdown));
        }
        presence
    }

    fn handle(&self) -> Handle {
        Handle {
            rooms: self.rooms.clone(),
            metrics: self.metrics.clone(),
            cluster: self.cluster.clone(),
            follow: self.follow.clone(),
        }
    }

    /// Counts `conn` (user `sub`) as joined to `room`; with `subscribe`, it
    /// gets the room's state now and diffs from then on, and without, a
    /// subscription from an earlier join ends. Call after `joined` is queued.
    pub async fn join(&self, room: &RoomName, conn: &Arc<Connection>, sub: &str, subscribe: bool) {
        // A node's first subscriber in a room needs the other nodes' users
        // for its state; read before taking the lock (a change read too
        // early is caught by the read the sync task does next).
        let mut remote = None;
        if let (Some(cluster), true) = (&self.cluster, subscribe) {
            if !self.rooms.get(room).is_some_and(|cell| cell.lock().wants_remote()) {
                match cluster.read(room, false).await {
                    Ok(users) => remote = Some(users),
                    Err(e) => tracing::warn!(%room, "cannot read presence from redis: {e}"),
                }
            }
        }
        let clustered = self.cluster.is_some();
        let handle = self.handle();
        handle.with_room(room, |presence, to_flush| {
            let followed = presence.wants_remote();
            presence.add_conn(conn.id, sub);
            presence.sync.local_dirty |= clustered;
            if subscribe {
                // A failed read is retried by the sync task.
                presence.sync.remote_due |= clustered && remote.is_none();
                let (new, pushed) = presence.subscribe(room, conn, remote);
                self.metrics.presence_states.inc();
                if new {
                    self.metrics.presence_subscribers.inc();
                }
                match pushed {
                    Ok(Pushed::FlushNeeded) => to_flush.push(conn.clone()),
                    Ok(Pushed::Queued) | Err(PushError::Closed) => {}
                    Err(PushError::Full) => {
                        self.metrics.slow_consumers.inc();
                    }
                }
            } else if presence.unsubscribe(conn.id) {
                self.metrics.presence_subscribers.dec();
            }
            handle.follow(room, followed, presence.wants_remote());
        });
    }

    /// `conn_id` left `room` (or closed): its user leaves when it was their
    /// last connection here.
    pub fn leave(&self, room: &RoomName, conn_id: u64) {
        let Some(cell) = self.rooms.get(room).map(|r| r.clone()) else { return };
        let handle = self.handle();
        {
            let mut presence = cell.lock();
            let followed = presence.wants_remote();
            if presence.unsubscribe(conn_id) {
                self.metrics.presence_subscribers.dec();
            }
            handle.follow(room, followed, presence.wants_remote());
            if presence.remove_conn(conn_id) {
                presence.sync.local_dirty |= self.cluster.is_some();
            }
            handle.schedule(room, &cell, &mut presence);
        }
        self.rooms.remove_if(room, |_, cell| {
            let mut presence = cell.lock();
            // A cluster room waits for its sync task to write the last leave.
            let idle = presence.is_idle() && !presence.sync.local_dirty;
            presence.removed |= idle;
            idle
        });
    }

    /// The answer to a `presence` request: this node's view on a single
    /// node, what every node wrote to Redis in a cluster.
    pub async fn answer(&self, room: &RoomName, reference: Option<&str>) -> Result<Bytes, PresenceError> {
        match &self.cluster {
            None => Ok(self.with_local_view(room, |view| outbound::presence(room, view, reference))),
            Some(cluster) => {
                let users = cluster_users(cluster, room).await?;
                Ok(outbound::presence(room, sorted_view(&users), reference))
            }
        }
    }

    /// `GET /rooms/{room}/presence`'s body.
    pub async fn json(&self, room: &RoomName) -> Result<Vec<u8>, PresenceError> {
        match &self.cluster {
            None => Ok(self.with_local_view(room, |view| outbound::presence_json(room, view))),
            Some(cluster) => {
                let users = cluster_users(cluster, room).await?;
                Ok(outbound::presence_json(room, sorted_view(&users)))
            }
        }
    }

    /// At shutdown, after the connections closed: removes this node's
    /// users from every room it still has in Redis, so the other nodes see
    /// them leave now rather than after `--presence-ttl`.
    pub async fn goodbye(&self, grace: Duration) {
        let Some(cluster) = &self.cluster else { return };
        let rooms: Vec<RoomName> = self.rooms.iter().map(|e| e.key().clone()).collect();
        let writes = rooms.iter().map(|room| cluster.write(room, &[]));
        if tokio::time::timeout(grace, futures_util::future::join_all(writes)).await.is_err() {
            tracing::warn!("presence goodbye not written in {grace:?}; other nodes drop this one's users by expiry");
        }
    }

    fn with_local_view<R>(
        &self,
        room: &RoomName,
        f: impl FnOnce(PresenceView<&mut dyn Iterator<Item = PresentUser<'_>>>) -> R,
    ) -> R {
        let cell = self.rooms.get(room).map(|r| r.clone()).unwrap_or_default();
        let presence = cell.lock();
        let view = presence.view();
        let mut members = view.members;
        f(PresenceView::new(view.count, &mut members, view.truncated))
    }
}

async fn cluster_users(cluster: &Cluster, room: &RoomName) -> Result<BTreeMap<String, u32>, PresenceError> {
    let users = cluster.read(room, true).await.map_err(|e| PresenceError(e.to_string()))?;
    Ok(users.into_iter().collect())
}

fn sorted_view(users: &BTreeMap<String, u32>) -> PresenceView<impl Iterator<Item = PresentUser<'_>>> {
    let members = users.iter().take(MAX_LISTED).map(|(sub, conns)| PresentUser { sub, conns: *conns });
    PresenceView::new(users.len(), members, users.len() > MAX_LISTED)
}

/// What the background tasks share with [`Presence`].
#[derive(Clone)]
struct Handle {
    rooms: Rooms,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<Cluster>>,
    follow: Option<mpsc::UnboundedSender<Follow>>,
}

impl Handle {
    /// Redis Cluster: starts or stops hearing `room`'s notices when it got
    /// its first presence subscriber here or lost its last. Called under
    /// the room's lock, so the listener gets a room's changes in order.
    fn follow(&self, room: &RoomName, before: bool, now: bool) {
        let Some(follow) = &self.follow else { return };
        let change = match (before, now) {
            (false, true) => Follow::Start(room.clone()),
            (true, false) => Follow::Stop(room.clone()),
            _ => return,
        };
        let _ = follow.send(change);
    }

    /// Runs `f` under the room's lock, creating the room if needed; then
    /// starts the sync task a change calls for and writes what `f` queued.
    fn with_room<R>(&self, name: &RoomName, f: impl FnOnce(&mut RoomPresence, &mut Vec<Arc<Connection>>) -> R) -> R {
        let mut to_flush = Vec::new();
        let mut f = Some(f);
        let result = loop {
            let cell = self.rooms.entry(name.clone()).or_default().clone();
            let mut presence = cell.lock();
            if presence.removed {
                continue;
            }
            if let Some(f) = f.take() {
                let result = f(&mut presence, &mut to_flush);
                self.schedule(name, &cell, &mut presence);
                break result;
            }
        };
        if !to_flush.is_empty() {
            flush_all(to_flush);
        }
        result
    }

    /// Starts the room's sync task when it has work and is not running.
    fn schedule(&self, name: &RoomName, cell: &RoomCell, presence: &mut RoomPresence) {
        let Some(at) = presence.sync_due() else { return };
        tokio::spawn(self.clone().sync(name.clone(), cell.clone(), at));
    }

    /// The room's sync task: rounds at most every [`DIFF_INTERVAL`] while
    /// there is work: write this node's users, read the others', send diffs.
    async fn sync(self, name: RoomName, cell: RoomCell, mut at: std::time::Instant) {
        loop {
            tokio::time::sleep_until(at.into()).await;
            let (local, read_remote) = cell.lock().start_round();
            if let Some(cluster) = &self.cluster {
                if let Some(local) = local {
                    if let Err(e) = cluster.write(&name, &local).await {
                        // The next heartbeat writes it again.
                        tracing::warn!(room = %name, "cannot write presence to redis: {e}");
                    }
                }
                if read_remote {
                    match cluster.read(&name, false).await {
                        Ok(users) => cell.lock().set_remote(users),
                        Err(e) => tracing::warn!(room = %name, "cannot read presence from redis: {e}"),
                    }
                }
            }
            let mut to_flush = Vec::new();
            let next = {
                let mut presence = cell.lock();
                presence.flush(&name, &self.metrics, &mut to_flush);
                presence.sync_again()
            };
            if !to_flush.is_empty() {
                flush_all(to_flush);
            }
            match next {
                Some(next) => at = next,
                None => break,
            }
        }
        // A room kept for its last write may go now.
        self.rooms.remove_if(&name, |_, cell| {
            let mut presence = cell.lock();
            let idle = presence.is_idle() && !presence.sync.local_dirty;
            presence.removed |= idle;
            idle
        });
    }

    /// Cluster: rewrites this node's contribution to every room it has
    /// users in (so it does not expire), and re-reads the rooms it has
    /// subscribers in (so a dead node's users leave). Only this node's
    /// rooms: no sweep reads every room.
    async fn heartbeat(self, shutdown: CancellationToken) {
        let Some(cluster) = &self.cluster else { return };
        let mut beats = tokio::time::interval(cluster.heartbeat());
        loop {
            tokio::select! {
                _ = beats.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let rooms: Vec<(RoomName, RoomCell)> =
                self.rooms.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
            for (name, cell) in rooms {
                let mut presence = cell.lock();
                presence.sync.local_dirty |= !presence.is_idle();
                presence.sync.remote_due |= presence.wants_remote();
                self.schedule(&name, &cell, &mut presence);
            }
        }
    }

    /// Cluster: hears the notices other nodes publish after writing, and
    /// has the rooms with subscribers here read again. Reconnects with a
    /// pause; after a reconnect every such room is read again.
    async fn listen(self, shutdown: CancellationToken) {
        let Some(cluster) = self.cluster.clone() else { return };
        loop {
            let listened = tokio::select! {
                result = self.listen_once(&cluster) => result,
                () = shutdown.cancelled() => return,
            };
            if let Err(e) = listened {
                tracing::warn!("presence pub/sub connection lost: {e}");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn listen_once(&self, cluster: &Cluster) -> redis::RedisResult<()> {
        let mut pubsub = cluster.pubsub_client()?.get_async_pubsub().await?;
        pubsub.psubscribe(cluster.pattern()).await?;
        // Whatever was missed while not listening.
        self.mark_all_remote_due();
        let mut stream = pubsub.on_message();
        while let Some(message) = stream.next().await {
            let node = message.get_payload_bytes();
            if node == cluster.node.as_bytes() {
                continue;
            }
            if let Some(room) = cluster.room_of_channel(message.get_channel_name()) {
                self.mark_room_due(&room);
            }
        }
        Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub stream ended")))
    }

    /// Redis Cluster: hears the notices of the rooms with presence
    /// subscribers here, on their shard channels, and has those rooms read
    /// again. A channel subscribed (again, after a reconnect or a slot
    /// move) has its rooms read again too: a notice may have been missed.
    async fn listen_sharded(self, mut followed: mpsc::UnboundedReceiver<Follow>, shutdown: CancellationToken) {
        let Some(cluster) = self.cluster.clone() else { return };
        let mut channels = match cluster.shard_channels() {
            Ok(channels) => channels,
            Err(e) => {
                // The bus opened the same seeds already, so this is not expected.
                tracing::error!(
                    "presence cannot subscribe on the redis cluster ({e}): other nodes heard by heartbeat only"
                );
                return;
            }
        };
        // The followed rooms on each channel (several when they share a hash tag).
        let mut rooms_on: HashMap<String, HashSet<RoomName>> = HashMap::new();
        loop {
            tokio::select! {
                change = followed.recv() => match change {
                    Some(Follow::Start(room)) => {
                        let channel = cluster.channel(&room);
                        let rooms = rooms_on.entry(channel.clone()).or_default();
                        rooms.insert(room);
                        if rooms.len() == 1 {
                            // Confirmed by a push, which has the room read again.
                            channels.subscribe(&channel).await;
                        }
                    }
                    Some(Follow::Stop(room)) => {
                        let channel = cluster.channel(&room);
                        if let Some(rooms) = rooms_on.get_mut(&channel) {
                            rooms.remove(&room);
                            if rooms.is_empty() {
                                rooms_on.remove(&channel);
                                channels.unsubscribe(&channel).await;
                            }
                        }
                    }
                    None => return,
                },
                event = channels.next() => match event {
                    Some(ChannelEvent::Message { payload, .. }) => {
                        if let Some((node, room)) = Cluster::parse_notice(&payload) {
                            if node != cluster.node {
                                self.mark_room_due(&room);
                            }
                        }
                    }
                    Some(ChannelEvent::Subscribed(channel)) => {
                        for room in rooms_on.get(&channel).into_iter().flatten() {
                            self.mark_room_due(room);
                        }
                    }
                    None => return,
                },
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Marks `room` for a read of the other nodes' presence, if it follows them.
    fn mark_room_due(&self, room: &RoomName) {
        let Some(cell) = self.rooms.get(room).map(|e| e.value().clone()) else { return };
        self.mark_due(room, &cell);
    }

    /// Marks every room that follows the other nodes (after a resubscribe:
    /// notices may have been missed).
    fn mark_all_remote_due(&self) {
        let rooms: Vec<(RoomName, RoomCell)> =
            self.rooms.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        for (name, cell) in rooms {
            self.mark_due(&name, &cell);
        }
    }

    fn mark_due(&self, room: &RoomName, cell: &RoomCell) {
        let mut presence = cell.lock();
        if presence.wants_remote() {
            presence.sync.remote_due = true;
            self.schedule(room, cell, &mut presence);
        }
    }
}
