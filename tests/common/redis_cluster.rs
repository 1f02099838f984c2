//! A real local Redis Cluster for the tests of `--redis-cluster` (the bus,
//! presence, the admin API): its seeds from `CHORUS_TEST_REDIS_CLUSTER`
//! (`scripts/test` starts one with `scripts/redis-cluster`), a key prefix of
//! the test's own whose keys are deleted from every primary when the test
//! ends, and a look at the primaries, their slots and their pub/sub. One
//! copy, included by each test file that needs it, so that the files agree
//! on what a test's prefix is and how its keys go away.

#![allow(dead_code)]

pub fn seeds() -> String {
    std::env::var("CHORUS_TEST_REDIS_CLUSTER").unwrap_or_else(|_| "redis://127.0.0.1:17100".to_owned())
}

/// `chorus-test-<test>-<pid>-<random>`: unique to the test and the run. On
/// a cluster the test throws away, nothing needs wiping, so this alone is
/// enough there; on a shared cluster, use `ClusterPrefix`.
pub fn unique_prefix(test: &str) -> String {
    format!("chorus-test-{test}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// The first seed's `host:port`, to ask the cluster about itself.
pub fn first_seed(seeds: &str) -> String {
    seeds.split(',').next().unwrap_or_default().trim().trim_start_matches("redis://").to_owned()
}

/// A plain connection to one cluster node, `host:port`.
pub fn node_conn(addr: &str) -> redis::Connection {
    redis::Client::open(format!("redis://{addr}")).unwrap().get_connection().expect("cluster node answers")
}

/// The cluster's primaries, by the slot ranges they own: `(start, end,
/// addr)`, from `CLUSTER SLOTS`.
pub fn slot_owners(seeds: &str) -> Vec<(u16, u16, String)> {
    try_slot_owners(seeds).expect("CLUSTER SLOTS")
}

/// `slot_owners` without panicking, for a `Drop` that may run while the
/// test unwinds.
fn try_slot_owners(seeds: &str) -> redis::RedisResult<Vec<(u16, u16, String)>> {
    let mut conn = redis::Client::open(format!("redis://{}", first_seed(seeds)))?.get_connection()?;
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
    let mut owners = Vec::new();
    for range in slots {
        let redis::Value::Array(parts) = range else { continue };
        let (Some(start), Some(end), Some(redis::Value::Array(primary))) = (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let (Some(host), Some(port)) = (primary.first(), primary.get(1)) else { continue };
        let host: String = redis::from_redis_value(host.clone())?;
        let port: u16 = redis::from_redis_value(port.clone())?;
        let (start, end): (u16, u16) = (redis::from_redis_value(start.clone())?, redis::from_redis_value(end.clone())?);
        owners.push((start, end, format!("{host}:{port}")));
    }
    Ok(owners)
}

/// The addresses of the cluster's primaries, each once, sorted.
pub fn primaries(seeds: &str) -> Vec<String> {
    try_primaries(seeds).expect("CLUSTER SLOTS")
}

fn try_primaries(seeds: &str) -> redis::RedisResult<Vec<String>> {
    let mut primaries: Vec<String> = try_slot_owners(seeds)?.into_iter().map(|(_, _, addr)| addr).collect();
    primaries.sort();
    primaries.dedup();
    Ok(primaries)
}

/// The keys matching `pattern` on each primary.
pub fn keys_by_primary(seeds: &str, pattern: &str) -> Vec<(String, Vec<String>)> {
    primaries(seeds)
        .into_iter()
        .map(|addr| {
            let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut node_conn(&addr)).unwrap();
            (addr, keys)
        })
        .collect()
}

/// Every shard channel matching `pattern` on the cluster, with the
/// subscribers its primary counts, sorted.
pub fn shard_channels(seeds: &str, pattern: &str) -> Vec<(String, i64)> {
    let mut found: Vec<(String, i64)> =
        shard_channels_on(seeds, pattern).into_iter().map(|(channel, count, _)| (channel, count)).collect();
    found.sort();
    found
}

/// Every shard channel matching `pattern` on the cluster: `(channel,
/// subscribers, primary)`, for a test that follows a channel from one
/// primary to another.
pub fn shard_channels_on(seeds: &str, pattern: &str) -> Vec<(String, i64, String)> {
    let mut found = Vec::new();
    for addr in primaries(seeds) {
        let mut conn = node_conn(&addr);
        let channels: Vec<String> = redis::cmd("PUBSUB").arg("SHARDCHANNELS").arg(pattern).query(&mut conn).unwrap();
        for channel in channels {
            let (_, count): (String, i64) =
                redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel).query(&mut conn).unwrap();
            found.push((channel, count, addr.clone()));
        }
    }
    found
}

/// Classic channels matching `pattern`, on any primary.
pub fn classic_channels(seeds: &str, pattern: &str) -> Vec<String> {
    let mut found = Vec::new();
    for addr in primaries(seeds) {
        let mut channels: Vec<String> =
            redis::cmd("PUBSUB").arg("CHANNELS").arg(pattern).query(&mut node_conn(&addr)).unwrap();
        found.append(&mut channels);
    }
    found
}

/// A key prefix of the test's own on the cluster; its keys are deleted
/// from every primary (one at a time: a DEL may not cross slots) when the
/// test ends, passing or not.
pub struct ClusterPrefix {
    name: String,
    seeds: String,
}

impl ClusterPrefix {
    pub fn new(test: &str, seeds: &str) -> Self {
        Self { name: unique_prefix(test), seeds: seeds.to_owned() }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

/// A prefix goes wherever a `&str` prefix does (`&prefix`, `{prefix}`), so
/// that a test with many uses need not spell out `as_str()` at each.
impl std::ops::Deref for ClusterPrefix {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for ClusterPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for ClusterPrefix {
    fn drop(&mut self) {
        // Never panics: the test may be unwinding already.
        let Ok(primaries) = try_primaries(&self.seeds) else { return };
        for addr in primaries {
            let Ok(mut conn) = redis::Client::open(format!("redis://{addr}")).and_then(|c| c.get_connection()) else {
                continue;
            };
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{}:*", self.name)).query(&mut conn).unwrap_or_default();
            for key in keys {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(key).query(&mut conn);
            }
        }
    }
}
