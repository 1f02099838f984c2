//! The command connection to Redis, replaced when it stops answering; or,
//! with `--redis-cluster`, the connection to a Redis Cluster.
//!
//! redis-rs's `ConnectionManager` reconnects when the socket breaks, but a
//! response timeout leaves it on the same socket; after a failover that
//! socket can stay open and silent for minutes. A timeout here swaps in a
//! fresh connection, so the next command goes to a socket that works.
//!
//! On a cluster, redis-rs's `ClusterConnection` holds a pipelined connection
//! per node, routes each command by its key's hash slot, follows `MOVED` and
//! `ASK`, and reloads the slot map after a failover; it also carries this
//! node's sharded subscriptions (RESP3 pushes), see `shards.rs`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

/// A command that takes longer than this counts as Redis being unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct CommandLink {
    kind: Kind,
}

enum Kind {
    Single {
        client: redis::Client,
        current: Mutex<ConnectionManager>,
    },
    /// Made on first use (a node may start before the cluster answers).
    Cluster {
        client: Box<ClusterClient>,
        connection: Mutex<Arc<OnceCell<ClusterConnection>>>,
        /// Whether a timeout replaces the connection (see `cluster_renewing`).
        renew: bool,
    },
}

/// A handle on the current connection; clones share its pipelined sockets.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl CommandLink {
    /// Connects lazily: a node may start before Redis does.
    pub fn new(client: redis::Client) -> RedisResult<Self> {
        let current = Mutex::new(connect(&client)?);
        Ok(Self { kind: Kind::Single { client, current } })
    }

    /// A link to a Redis Cluster; connects on first use.
    pub fn cluster(client: ClusterClient) -> Self {
        Self { kind: Kind::Cluster { client: Box::new(client), connection: Mutex::default(), renew: false } }
    }

    /// A link to a Redis Cluster that makes a fresh connection after a
    /// timeout, for a client without subscriptions. Measured: a cluster
    /// connection with many requests in flight to a primary that died
    /// kept timing out long after its replica was promoted.
    pub fn cluster_renewing(client: ClusterClient) -> Self {
        Self { kind: Kind::Cluster { client: Box::new(client), connection: Mutex::default(), renew: true } }
    }

    /// A handle on the current connection.
    pub async fn get(&self) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Single { current, .. } => Ok(Conn::Single(current.lock().clone())),
            Kind::Cluster { client, connection, .. } => {
                let connect = || async {
                    tokio::time::timeout(CONNECT_TIMEOUT * 3, client.get_async_connection())
                        .await
                        .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
                };
                let cell = connection.lock().clone();
                Ok(Conn::Cluster(cell.get_or_try_init(connect).await?.clone()))
            }
        }
    }

    /// Reports a failed command: a timeout replaces a single Redis's
    /// connection (a cluster connection reconnects per node by itself,
    /// unless made by `cluster_renewing`).
    pub fn failed(&self, error: &RedisError) {
        if !error.is_timeout() {
            return;
        }
        let (client, current) = match &self.kind {
            Kind::Single { client, current } => (client, current),
            Kind::Cluster { connection, renew: true, .. } => {
                *connection.lock() = Arc::default();
                return;
            }
            Kind::Cluster { .. } => return,
        };
        match connect(client) {
            Ok(fresh) => *current.lock() = fresh,
            Err(e) => tracing::warn!("cannot replace the redis command connection: {e}"),
        }
    }

    /// Runs `command` on the current connection, replacing it on timeout.
    pub async fn run<T, F, Fut>(&self, command: F) -> RedisResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let result = match self.get().await {
            Ok(conn) => command(conn).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
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

/// The cluster client: RESP3 (sharded messages arrive as pushes on the
/// command connections, sent to `pushes`; `None` for a client that never
/// subscribes), and the same timeouts as above.
pub fn cluster_client(
    seeds: &str,
    pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> RedisResult<ClusterClient> {
    let seeds: Vec<&str> = seeds.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut builder = ClusterClient::builder(seeds).use_protocol(redis::ProtocolVersion::RESP3);
    if let Some(pushes) = pushes {
        builder = builder.push_sender(pushes);
    }
    builder.connection_timeout(CONNECT_TIMEOUT).response_timeout(RESPONSE_TIMEOUT).retries(3).build()
}
