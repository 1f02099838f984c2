//! A real local Redis Cluster for tests of what runs beside the bus on
//! `--redis-cluster` (presence, the admin API): its seeds from
//! `CHORUS_TEST_REDIS_CLUSTER` (`scripts/test` starts one with
//! `scripts/redis-cluster`), a key prefix of the test's own whose keys are
//! deleted from every primary when the test ends, and a look at the
//! primaries' pub/sub.

#![allow(dead_code)]

pub fn seeds() -> String {
    std::env::var("CHORUS_TEST_REDIS_CLUSTER").unwrap_or_else(|_| "redis://127.0.0.1:17100".to_owned())
}

/// A plain connection to one cluster node, `host:port`.
pub fn node_conn(addr: &str) -> redis::Connection {
    redis::Client::open(format!("redis://{addr}")).unwrap().get_connection().expect("cluster node answers")
}

/// The addresses of the cluster's primaries, from `CLUSTER SLOTS`.
pub fn primaries(seeds: &str) -> Vec<String> {
    try_primaries(seeds).expect("CLUSTER SLOTS")
}

fn try_primaries(seeds: &str) -> redis::RedisResult<Vec<String>> {
    let first = seeds.split(',').next().unwrap_or_default().trim().trim_start_matches("redis://").to_owned();
    let mut conn = redis::Client::open(format!("redis://{first}"))?.get_connection()?;
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
    let mut primaries = Vec::new();
    for range in slots {
        let redis::Value::Array(parts) = range else { continue };
        let Some(redis::Value::Array(primary)) = parts.get(2) else { continue };
        let (Some(host), Some(port)) = (primary.first(), primary.get(1)) else { continue };
        let host: String = redis::from_redis_value(host.clone())?;
        let port: u16 = redis::from_redis_value(port.clone())?;
        primaries.push(format!("{host}:{port}"));
    }
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
/// subscribers its primary counts.
pub fn shard_channels(seeds: &str, pattern: &str) -> Vec<(String, i64)> {
    let mut found = Vec::new();
    for addr in primaries(seeds) {
        let mut conn = node_conn(&addr);
        let channels: Vec<String> = redis::cmd("PUBSUB").arg("SHARDCHANNELS").arg(pattern).query(&mut conn).unwrap();
        for channel in channels {
            let (_, count): (String, i64) =
                redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel).query(&mut conn).unwrap();
            found.push((channel, count));
        }
    }
    found.sort();
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
        let name = format!("chorus-test-{test}-{}-{:08x}", std::process::id(), rand::random::<u32>());
        Self { name, seeds: seeds.to_owned() }
    }

    pub fn as_str(&self) -> &str {
        &self.name
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
