//! A Redis key prefix of a test's own: the keys under it are deleted when
//! the test ends, passing or not, so the machine's shared Redis keeps
//! nothing from test runs.

#![allow(dead_code)]

pub struct TestPrefix {
    name: String,
    url: String,
}

impl TestPrefix {
    /// `chorus-test-<test>-<pid>-<random>`, on the Redis at `url`.
    pub fn new(test: &str, url: &str) -> Self {
        let name = format!("chorus-test-{test}-{}-{:08x}", std::process::id(), rand::random::<u32>());
        Self { name, url: url.to_owned() }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl Drop for TestPrefix {
    fn drop(&mut self) {
        // A blocking client: the test's runtime may already be shutting down.
        let Ok(mut conn) = redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection()) else { return };
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", self.name)).query(&mut conn).unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}
