//! Presence across a cluster, through Redis.
//!
//! Each node writes its own contribution to a room (user → joined
//! connections on that node) as one hash per node and room, which expires
//! unless the node's heartbeat rewrites it: a node that dies without a
//! goodbye drops out within `--presence-ttl`. A set per room lists the
//! nodes that wrote; readers drop the nodes whose hash expired. All of a
//! room's presence keys carry the room's hash tag (the bus's
//! `Keys::room_tag`), so each script call touches one slot, and on a Redis
//! Cluster runs on the shard that holds the rest of the room; the calls go
//! through the bus's command link, which routes them there.
//!
//! After a write, the node publishes a notice; the nodes with presence
//! subscribers in that room read the room again and send their diffs. On
//! one Redis the notice is a classic `PUBLISH` on `<prefix>:presence:<room>`
//! and one pattern subscription per node hears every room's notices (they
//! are small and batched to at most ten a second per room and node). On a
//! Redis Cluster a classic `PUBLISH` would be copied to every node of the
//! cluster, so the notice is an `SPUBLISH` on a shard channel in the room's
//! slot, and only the nodes with presence subscribers in the room
//! `SSUBSCRIBE` to it, on that shard (see `Handle::listen_sharded`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisResult, Script};

use crate::bus::redis::{RedisAccess, ShardChannels};
use crate::room::RoomName;

/// KEYS: this node's hash, the room's node set. ARGV: node, expiry (ms),
/// notice channel, publish command, notice, then `sub, conns` pairs.
const WRITE: &str = r"
redis.call('DEL', KEYS[1])
if #ARGV > 5 then
  for i = 6, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SREM', KEYS[2], ARGV[1])
end
redis.call(ARGV[4], ARGV[3], ARGV[5])
return 1
";

/// KEYS: the room's node set. ARGV: the prefix of the nodes' hashes (in the
/// same slot), the node to skip.
const READ: &str = r"
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[2] then
    local fields = redis.call('HGETALL', ARGV[1] .. node)
    if #fields == 0 then
      redis.call('SREM', KEYS[1], node)
    else
      for i = 1, #fields do
        out[#out + 1] = fields[i]
      end
    end
  end
end
return out
";

pub struct Cluster {
    access: RedisAccess,
    prefix: String,
    pub node: String,
    /// How long a node's contribution lives without a heartbeat.
    expiry: Duration,
    write: Script,
    read: Script,
}

impl Cluster {
    /// Presence over the bus's Redis (or Redis Cluster); `ttl` is
    /// `--presence-ttl`.
    pub fn new(access: RedisAccess, prefix: &str, node: String, ttl: Duration) -> Self {
        Self {
            access,
            prefix: prefix.to_owned(),
            node,
            // Rewritten every quarter of the ttl and read as often, so a
            // dead node's users leave within the ttl.
            expiry: ttl / 2,
            write: Script::new(WRITE),
            read: Script::new(READ),
        }
    }

    /// Whether notices travel on shard channels (Redis Cluster) rather than
    /// by a pattern subscription.
    pub fn is_sharded(&self) -> bool {
        self.access.is_cluster()
    }

    /// How often a node rewrites its contributions and re-reads the rooms
    /// it has presence subscribers in.
    pub fn heartbeat(&self) -> Duration {
        self.expiry / 2
    }

    fn node_key_prefix(&self, room: &RoomName) -> String {
        format!("{}:{}:presence:", self.prefix, self.access.keys.room_tag(room))
    }

    fn nodes_key(&self, room: &RoomName) -> String {
        format!("{}:{}:presence", self.prefix, self.access.keys.room_tag(room))
    }

    /// Where a write's notice goes: on a cluster a shard channel in the
    /// room's slot (rooms that share a hash tag share it), on one Redis
    /// the room's own channel.
    pub fn channel(&self, room: &RoomName) -> String {
        if self.is_sharded() {
            format!("{}:presence:{}", self.prefix, self.access.keys.room_tag(room))
        } else {
            format!("{}:presence:{room}", self.prefix)
        }
    }

    /// A write's notice: the node that wrote, and on a cluster the room
    /// (the channel may be shared by several rooms there).
    fn notice(&self, room: &RoomName) -> String {
        if self.is_sharded() {
            format!("{} {room}", self.node)
        } else {
            self.node.clone()
        }
    }

    /// The node and room of a notice heard on a shard channel.
    pub fn parse_notice(payload: &[u8]) -> Option<(&str, RoomName)> {
        let text = std::str::from_utf8(payload).ok()?;
        let (node, room) = text.split_once(' ')?;
        Some((node, RoomName::parse(room).ok()?))
    }

    /// What a node subscribes to on one Redis, to hear every room's notices.
    pub fn pattern(&self) -> String {
        format!("{}:presence:*", self.prefix)
    }

    pub fn room_of_channel(&self, channel: &str) -> Option<RoomName> {
        let name = channel.strip_prefix(&self.prefix)?.strip_prefix(":presence:")?;
        RoomName::parse(name).ok()
    }

    /// One Redis: a client for the pattern subscription.
    pub fn pubsub_client(&self) -> RedisResult<redis::Client> {
        redis::Client::open(self.access.url.as_str())
    }

    /// Redis Cluster: the shard channels' own connection.
    pub fn shard_channels(&self) -> RedisResult<ShardChannels> {
        self.access.shard_channels()
    }

    /// Replaces this node's contribution to `room` and tells the others.
    pub async fn write(&self, room: &RoomName, local: &[(Arc<str>, u32)]) -> RedisResult<()> {
        let mut invocation = self.write.key(format!("{}{}", self.node_key_prefix(room), self.node));
        invocation
            .key(self.nodes_key(room))
            .arg(&self.node)
            .arg(self.expiry.as_millis() as u64)
            .arg(self.channel(room))
            .arg(self.access.keys.publish_command())
            .arg(self.notice(room));
        for (sub, conns) in local {
            invocation.arg(&**sub).arg(*conns);
        }
        let invocation = &invocation;
        self.access
            .link
            .run(|mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await })
            .await
            .map(|_| ())
    }

    /// The users of `room` and their connections on every live node, this
    /// one included or not.
    pub async fn read(&self, room: &RoomName, include_self: bool) -> RedisResult<HashMap<String, u32>> {
        let skip = if include_self { "" } else { self.node.as_str() };
        let mut invocation = self.read.key(self.nodes_key(room));
        invocation.arg(self.node_key_prefix(room)).arg(skip);
        let invocation = &invocation;
        let flat: Vec<String> =
            self.access.link.run(|mut conn| async move { invocation.invoke_async(&mut conn).await }).await?;
        let mut users = HashMap::new();
        for pair in flat.chunks_exact(2) {
            if let [sub, conns] = pair {
                let conns: u32 = conns.parse().unwrap_or(0);
                if conns > 0 {
                    *users.entry(sub.clone()).or_insert(0) += conns;
                }
            }
        }
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_notice_names_the_node_and_the_room() {
        let (node, room) = Cluster::parse_notice(b"00ab lobby:1").unwrap();
        assert_eq!((node, room.as_str()), ("00ab", "lobby:1"));
        assert!(Cluster::parse_notice(b"00ab").is_none());
        assert!(Cluster::parse_notice(b"00ab not a room").is_none());
        assert!(Cluster::parse_notice(b"\xff lobby").is_none());
    }
}
