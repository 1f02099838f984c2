//! The command connection to Redis, replaced when it stops answering.
//!
//! redis-rs's `ConnectionManager` reconnects when the socket breaks, but a
//! response timeout leaves it on the same socket; after a failover that
//! socket can stay open and silent for minutes. A timeout here swaps in a
//! fresh connection, so the next command goes to a socket that works.

use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};

/// A command that takes longer than this counts as Redis being unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct CommandLink {
    client: redis::Client,
    current: Mutex<ConnectionManager>,
}

impl CommandLink {
    /// Connects lazily: a node may start before Redis does.
    pub fn new(client: redis::Client) -> RedisResult<Self> {
        let current = Mutex::new(connect(&client)?);
        Ok(Self { client, current })
    }

    /// A handle on the current connection; clones share one pipelined socket.
    pub fn get(&self) -> ConnectionManager {
        self.current.lock().clone()
    }

    /// Reports a failed command: a timeout replaces the connection.
    pub fn failed(&self, error: &RedisError) {
        if !error.is_timeout() {
            return;
        }
        match connect(&self.client) {
            Ok(fresh) => *self.current.lock() = fresh,
            Err(e) => tracing::warn!("cannot replace the redis command connection: {e}"),
        }
    }

    /// Runs `command` on the current connection, replacing it on timeout.
    pub async fn run<T, F, Fut>(&self, command: F) -> RedisResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let result = command(self.get()).await;
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }
}

fn connect(client: &redis::Client) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}
