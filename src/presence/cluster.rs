//! Presence across a cluster, through Redis.
//!
//! Each node writes its own contribution to a room (user → joined
//! connections on that node) as one hash per node and room, which expires
//! unless the node's heartbeat rewrites it: a node that dies without a
//! goodbye drops out within `--presence-ttl`. A set per room lists the
//! nodes that wrote; readers drop the nodes whose hash expired. All of a
//! room's presence keys share the room's hash tag. After a write, the node
//! publishes its id on the room's presence channel; the nodes with presence
//! subscribers in that room read the room again and send their diffs. One
//! pattern subscription per node hears every room's notices (they are
//! small and batched to at most ten a second per room and node).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};

use crate::room::RoomName;

const WRITE: &str = r"
redis.call('DEL', KEYS[1])
if #ARGV > 3 then
  for i = 4, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SREM', KEYS[2], ARGV[1])
end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
";

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
    conn: ConnectionManager,
    pub client: redis::Client,
    prefix: String,
    pub node: String,
    /// How long a node's contribution lives without a heartbeat.
    expiry: Duration,
    write: Script,
    read: Script,
}

impl Cluster {
    /// Connects lazily, as the bus does; `ttl` is `--presence-ttl`.
    pub fn new(url: &str, prefix: &str, node: String, ttl: Duration) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            conn,
            client,
            prefix: prefix.to_owned(),
            node,
            // Rewritten every quarter of the ttl and read as often, so a
            // dead node's users leave within the ttl.
            expiry: ttl / 2,
            write: Script::new(WRITE),
            read: Script::new(READ),
        })
    }

    /// How often a node rewrites its contributions and re-reads the rooms
    /// it has presence subscribers in.
    pub fn heartbeat(&self) -> Duration {
        self.expiry / 2
    }

    fn node_key_prefix(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:presence:", self.prefix)
    }

    fn nodes_key(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:presence", self.prefix)
    }

    fn channel(&self, room: &RoomName) -> String {
        format!("{}:presence:{room}", self.prefix)
    }

    /// What a node subscribes to, to hear every room's notices.
    pub fn pattern(&self) -> String {
        format!("{}:presence:*", self.prefix)
    }

    pub fn room_of_channel(&self, channel: &str) -> Option<RoomName> {
        let name = channel.strip_prefix(&self.prefix)?.strip_prefix(":presence:")?;
        RoomName::parse(name).ok()
    }

    /// Replaces this node's contribution to `room` and tells the others.
    pub async fn write(&self, room: &RoomName, local: &[(Arc<str>, u32)]) -> RedisResult<()> {
        let mut invocation = self.write.key(format!("{}{}", self.node_key_prefix(room), self.node));
        invocation
            .key(self.nodes_key(room))
            .arg(&self.node)
            .arg(self.expiry.as_millis() as u64)
            .arg(self.channel(room));
        for (sub, conns) in local {
            invocation.arg(&**sub).arg(*conns);
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async::<i64>(&mut conn).await.map(|_| ())
    }

    /// The users of `room` and their connections on every live node, this
    /// one included or not.
    pub async fn read(&self, room: &RoomName, include_self: bool) -> RedisResult<HashMap<String, u32>> {
        let skip = if include_self { "" } else { self.node.as_str() };
        let mut conn = self.conn.clone();
        let flat: Vec<String> = self
            .read
            .key(self.nodes_key(room))
            .arg(self.node_key_prefix(room))
            .arg(skip)
            .invoke_async(&mut conn)
            .await?;
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
