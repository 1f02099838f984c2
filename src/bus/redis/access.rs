//! What presence and the admin API use of the bus's Redis: its command
//! link, its key names and the URL it was opened with.
//!
//! Their commands go through the bus's link, which on a Redis Cluster
//! routes each one to the shard that owns its key's slot and follows
//! `MOVED` and `ASK`: there is one router, not one per feature. Their key
//! names take the room's hash tag from the bus's `Keys`, so a room's
//! presence lives in the same slot as the rest of the room.

use std::sync::Arc;

use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, RedisResult, Value};

use super::channels::ShardChannels;
use super::keys::Keys;
use super::link::{CommandLink, Conn};

/// Keys asked for per `SCAN` call.
const SCAN_COUNT: usize = 1000;

#[derive(Clone)]
pub struct RedisAccess {
    pub link: Arc<CommandLink>,
    pub keys: Keys,
    /// `--redis-url`: the one Redis, or the cluster's seed nodes.
    pub url: String,
}

impl RedisAccess {
    pub fn is_cluster(&self) -> bool {
        self.keys.is_cluster()
    }

    /// Runs one command, on the shard of its key on a cluster.
    pub async fn query<T: FromRedisValue>(&self, command: &Cmd) -> RedisResult<T> {
        self.link.run(|mut conn| async move { command.query_async(&mut conn).await }).await
    }

    /// Subscriptions to sharded channels, on a cluster connection of their own.
    pub fn shard_channels(&self) -> RedisResult<ShardChannels> {
        ShardChannels::open(&self.url)
    }

    /// Every key that matches `pattern`: `SCAN` on the one Redis, or on
    /// every primary of the cluster (each holds only its slots' keys).
    pub async fn scan(&self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut found = Vec::new();
        match self.link.get().await? {
            Conn::Single(mut conn) => {
                let mut cursor = 0;
                loop {
                    let (next, mut keys): (u64, Vec<String>) = scan(cursor, pattern).query_async(&mut conn).await?;
                    found.append(&mut keys);
                    if next == 0 {
                        return Ok(found);
                    }
                    cursor = next;
                }
            }
            Conn::Cluster(mut conn) => {
                // The first call goes to every primary at once and answers
                // each one's cursor by its address; each goes on from there.
                let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let first = conn.route_command(scan(0, pattern), all).await?;
                for (address, reply) in by_address(first)? {
                    let (mut cursor, mut keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                    found.append(&mut keys);
                    let (host, port) = split_address(&address)?;
                    while cursor != 0 {
                        let node = SingleNodeRoutingInfo::ByAddress { host: host.clone(), port };
                        let reply = conn.route_command(scan(cursor, pattern), RoutingInfo::SingleNode(node)).await?;
                        let (next, mut keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                        found.append(&mut keys);
                        cursor = next;
                    }
                }
                Ok(found)
            }
        }
    }
}

fn scan(cursor: u64, pattern: &str) -> Cmd {
    let mut command = redis::cmd("SCAN");
    command.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
    command
}

/// A reply of every primary, keyed by node address (`host:port`), as
/// redis-rs gives a fanned-out command with no way to combine the replies.
fn by_address(reply: Value) -> RedisResult<Vec<(String, Value)>> {
    let Value::Map(pairs) = reply else {
        return Err(protocol_error("a reply by node address"));
    };
    pairs
        .into_iter()
        .map(|(address, reply)| match reply {
            Value::ServerError(e) => Err(e.into()),
            reply => Ok((redis::from_redis_value(address)?, reply)),
        })
        .collect()
}

fn split_address(address: &str) -> RedisResult<(String, u16)> {
    let (host, port) = address.rsplit_once(':').ok_or_else(|| protocol_error("a node address"))?;
    let port = port.parse().map_err(|_| protocol_error("a node port"))?;
    Ok((host.to_owned(), port))
}

fn protocol_error(expected: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "expected", expected.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_split_at_the_last_colon() {
        assert_eq!(split_address("127.0.0.1:7000").unwrap(), ("127.0.0.1".to_owned(), 7000));
        assert_eq!(split_address("dead::beef:7001").unwrap(), ("dead::beef".to_owned(), 7001));
        assert!(split_address("nowhere").is_err());
        assert!(split_address("host:port").is_err());
    }

    #[test]
    fn fanned_out_replies_are_read_by_address() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Map(vec![(bulk("a:1"), Value::Array(vec![bulk("0"), Value::Array(vec![bulk("k")])]))]);
        let replies = by_address(reply).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0, "a:1");
        let (cursor, keys): (u64, Vec<String>) = redis::from_redis_value(replies[0].1.clone()).unwrap();
        assert_eq!((cursor, keys), (0, vec!["k".to_owned()]));
        assert!(by_address(Value::Nil).is_err());
    }
}
