//! The Lua scripts a node runs on Redis, and what it does when a room's
//! state there is gone.
//!
//! Without a database a room whose state Redis lost simply starts a new
//! epoch at seq 1. With one, the database's rows would collide with that, so
//! the scripts refuse (`NOSTATE`) and the node first puts the state back:
//! the database's highest seq, and a new epoch (members may have seen
//! messages the database never got), or, with `--durable-acks`, the same
//! epoch, since every delivered message is in the database.

use std::sync::Arc;

use redis::{RedisError, Script};
use serde_json::value::RawValue;

use super::keys::Keys;
use super::link::CommandLink;
use crate::bus::{fresh_epoch, BusError};
use crate::history::Database;
use crate::protocol::outbound::write_json_string;
use crate::registry::{Snapshot, StoredMessage};
use crate::room::RoomName;
use crate::ws::frame::text_frame;

pub struct Scripts {
    pub link: Arc<CommandLink>,
    pub keys: Keys,
    pub history_size: usize,
    pub db: Option<Arc<Database>>,
    pub durable_acks: bool,
    /// This node's name, for its probe and ack channels.
    pub node: String,
    /// The most messages waiting for the database before publishing refuses.
    pub persist_queue: usize,
    /// Time to live of a room's keys in ms (`--history-ttl`), renewed by
    /// every publish and join and, for rooms with members, by the node's
    /// `expiry` task; 0 keeps them forever.
    pub key_ttl_ms: u64,
    publish: Script,
    snapshot: Script,
    restore: Script,
}

/// With `--durable-acks`: a committed message to make visible.
pub struct Release {
    pub room: RoomName,
    pub seq: u64,
    pub epoch: String,
    pub json: Vec<u8>,
    /// The node that published it and its request id, to ack.
    pub node: String,
    pub request: String,
}

/// What the publish script answered.
pub struct Published {
    pub seq: u64,
}

impl Scripts {
    pub fn new(
        link: Arc<CommandLink>,
        keys: Keys,
        history_size: usize,
        db: Option<Arc<Database>>,
        node: String,
    ) -> Self {
        // On a cluster, the scripts that read or give out a room's seq first
        // check that no failover lost part of it (see fence.lua).
        let persisted = db.is_some();
        let fenced = |script: &str| {
            if keys.is_cluster() {
                Script::new(&format!("local FENCE_PERSISTED = {persisted}\n{}\n{script}", include_str!("fence.lua")))
            } else {
                Script::new(script)
            }
        };
        Self {
            publish: fenced(include_str!("publish.lua")),
            snapshot: fenced(include_str!("snapshot.lua")),
            link,
            keys,
            history_size,
            db,
            durable_acks: false,
            node,
            persist_queue: 100_000,
            key_ttl_ms: 0,
            restore: Script::new(include_str!("restore.lua")),
        }
    }

    fn persisting(&self) -> &'static str {
        if self.db.is_some() {
            "1"
        } else {
            "0"
        }
    }

    /// The most messages one partition's stream may hold: on a cluster
    /// each partition gets an equal share of `--persist-queue`, so the
    /// whole stays within it.
    fn partition_queue(&self) -> usize {
        self.persist_queue.div_ceil(usize::from(self.keys.partitions())).max(1)
    }

    /// `request` (with `--durable-acks`) names the publish in the ack that
    /// the database writer sends back once the message is committed.
    pub async fn publish(
        &self,
        room: &RoomName,
        from: &str,
        ts: u64,
        body: &RawValue,
        request: Option<u64>,
    ) -> Result<Published, BusError> {
        let mut from_json = Vec::with_capacity(from.len() + 2);
        write_json_string(&mut from_json, from);
        let mut call = self.publish.key(self.keys.state(room));
        call.key(self.keys.history(room))
            .key(self.keys.pending_for(room))
            .arg(self.keys.channel(room))
            .arg(self.history_size)
            .arg(room.as_str())
            .arg(from_json)
            .arg(ts)
            .arg(body.get())
            .arg(fresh_epoch())
            .arg(self.persisting())
            .arg(self.partition_queue());
        match request {
            Some(request) => call.arg(&self.node).arg(request),
            None => call.arg("").arg(""),
        };
        call.arg(self.key_ttl_ms).arg(self.keys.publish_command());
        let call = &call;
        let invoke =
            || self.link.run(move |mut conn| async move { call.invoke_async::<(u64, String)>(&mut conn).await });
        let (seq, _epoch) = match invoke().await {
            Err(e) if is(&e, "NOSTATE") => {
                self.restore(room).await?;
                invoke().await
            }
            other => other,
        }
        .map_err(refusal)?;
        Ok(Published { seq })
    }

    /// The room's seq and epoch, and the messages after `since`, atomically.
    pub async fn snapshot(&self, room: &RoomName, since: Option<u64>) -> Result<Snapshot, BusError> {
        let mut call = self.snapshot.key(self.keys.state(room));
        call.key(self.keys.history(room))
            .arg(fresh_epoch())
            .arg(since.map(|s| s.to_string()).unwrap_or_default())
            .arg(self.persisting())
            .arg(if self.durable_acks { "released" } else { "seq" })
            .arg(self.key_ttl_ms);
        let call = &call;
        let invoke = || {
            self.link
                .run(move |mut conn| async move { call.invoke_async::<(u64, String, Vec<Vec<u8>>)>(&mut conn).await })
        };
        let (seq, epoch, flat) = match invoke().await {
            Err(e) if is(&e, "NOSTATE") => {
                self.restore(room).await?;
                invoke().await
            }
            other => other,
        }
        .map_err(BusError::redis)?;
        Ok(Snapshot { seq, epoch: epoch.into(), messages: stored_messages(&flat) })
    }

    /// With `--durable-acks`: makes committed messages visible, in order, in
    /// one round trip. On a cluster they must be of one partition (a
    /// pipeline may not cross slots).
    pub async fn release(&self, messages: &[Release]) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        for m in messages {
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(2)
                .arg(self.keys.state(&m.room))
                .arg(self.keys.history(&m.room))
                .arg(self.keys.channel(&m.room))
                .arg(self.history_size)
                .arg(m.seq)
                .arg(&m.epoch)
                .arg(&m.json)
                .arg(self.keys.acks(self.keys.partition(&m.room), &m.node))
                .arg(&m.request)
                .arg(self.key_ttl_ms)
                .arg(self.keys.publish_command())
                .ignore();
        }
        self.link.run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await
    }

    /// With `--durable-acks`: whether `seq` of `room` was released (its ack
    /// may have been lost while this node's pub/sub connection was down).
    pub async fn is_released(&self, room: &RoomName, seq: u64) -> Result<bool, BusError> {
        let mut get = redis::cmd("HGET");
        get.arg(self.keys.state(room)).arg("released");
        let released: Option<u64> =
            self.link.run(|mut conn| async move { get.query_async(&mut conn).await }).await.map_err(BusError::redis)?;
        Ok(released.is_some_and(|r| r >= seq))
    }

    /// Puts back a room's state from the database (see the module doc).
    async fn restore(&self, room: &RoomName) -> Result<(), BusError> {
        let Some(db) = &self.db else { return Ok(()) };
        let (seq, stored_epoch) = db.room_state(room).await.map_err(BusError::database)?;
        let epoch = match stored_epoch {
            Some(epoch) if self.durable_acks => epoch,
            _ => fresh_epoch(),
        };
        let mut call = self.restore.key(self.keys.state(room));
        call.key(self.keys.history(room)).arg(epoch).arg(seq).arg(self.key_ttl_ms);
        self.link
            .run(|mut conn| async move { call.invoke_async::<String>(&mut conn).await })
            .await
            .map_err(BusError::redis)?;
        tracing::warn!("redis had lost the state of room {room}: restored at seq {seq}");
        Ok(())
    }
}

const RELEASE: &str = include_str!("release.lua");

fn is(error: &RedisError, code: &str) -> bool {
    error.code() == Some(code)
}

/// A script's refusal in the words of PROTOCOL.md: the database queue being
/// full is the database's unavailability, anything else Redis's.
fn refusal(error: RedisError) -> BusError {
    if is(&error, "QUEUEFULL") {
        BusError::database("the database write queue is full")
    } else {
        BusError::redis(error)
    }
}

/// Messages from a `WITHSCORES` reply: member (the JSON), then score (the seq).
pub fn stored_messages(flat: &[Vec<u8>]) -> Vec<StoredMessage> {
    flat.chunks_exact(2)
        .filter_map(|pair| {
            let seq = std::str::from_utf8(&pair[1]).ok()?.parse().ok()?;
            Some(StoredMessage::new(seq, text_frame(&pair[0])))
        })
        .collect()
}
