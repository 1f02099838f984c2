//! Starting and stopping a server: the listener, the accept loop, one hyper
//! connection per socket, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::bus::redis::{RedisBus, RedisSettings};
use crate::bus::{fresh_epoch, local, Bus, Persistence};
use crate::config::Config;
use crate::conn::coalesce;
use crate::history::writer::WriteBehind;
use crate::history::Database;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::state::ServerState;
use crate::{eviction, http, liveness};

/// Pending connections the kernel holds for us during a connection storm.
const LISTEN_BACKLOG: i32 = 4096;

/// A running server.
pub struct Server {
    state: Arc<ServerState>,
    local_addr: SocketAddr,
    accept: JoinHandle<()>,
    sweep: JoinHandle<()>,
}

impl Server {
    /// Binds the listener and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        let listener = bind(config.listen)?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(build_state(config).await?);
        let accept = tokio::spawn(accept_loop(state.clone(), listener));
        let sweep = tokio::spawn(liveness::run(state.clone()));
        // Ends by itself at shutdown.
        tokio::spawn(coalesce::run(state.writer.clone(), state.shutdown.clone()));
        // Ends by itself at shutdown; nothing waits for it.
        tokio::spawn(eviction::run(state.clone(), state.config.history_ttl));
        Ok(Self { state, local_addr, accept, sweep })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Stops accepting, closes every connection with 1001 after what is
    /// already queued, and waits up to `grace` for them to finish.
    pub async fn shutdown(self, grace: Duration) {
        let state = self.state;
        state.shutdown.cancel();
        let _ = self.accept.await;
        let _ = self.sweep.await;
        for conn in state.connections.iter() {
            conn.close(1001, "going away");
        }
        state.tasks.close();
        if tokio::time::timeout(grace, state.tasks.wait()).await.is_err() {
            tracing::warn!("{} connections still open after {grace:?}", state.connections.len());
        }
        state.presence.goodbye(grace).await;
        if !state.bus.flush(grace).await {
            tracing::error!("history not fully written to the database; the next start begins new epochs");
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The shared state, with the bus that `--redis-url` and `--database-url`
/// ask for. Without a database a single node's epoch is new at every start:
/// its sequences live in memory only.
async fn build_state(config: Config) -> std::io::Result<ServerState> {
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let registry = Arc::new(
        Registry::with_history_memory(config.history_size, fresh_epoch().into(), config.history_memory)
            .with_compression(config.compression_min_bytes),
    );
    let bus = match &config.redis_url {
        None => {
            let persistence = match &config.database_url {
                Some(url) => Some(open_persistence(url, &config, metrics.clone()).await?),
                None => None,
            };
            Bus::local(registry, metrics.clone(), persistence)
        }
        Some(url) => {
            let database = match &config.database_url {
                Some(db_url) => Some((open_database(db_url).await?, config.persist_queue)),
                None => None,
            };
            let settings = RedisSettings {
                url,
                prefix: &config.redis_prefix,
                history_size: config.history_size,
                database,
                durable_acks: config.durable_acks,
                key_ttl: config.history_ttl,
                cluster: config.redis_cluster,
            };
            let redis = RedisBus::start(settings, registry.clone(), metrics.clone(), shutdown.clone())
                .map_err(std::io::Error::other)?;
            Bus::redis(registry, metrics.clone(), redis)
        }
    };
    Ok(ServerState::new(config, bus, metrics, shutdown))
}

/// Connects to the database and brings its schema up to date.
async fn open_database(url: &str) -> std::io::Result<Arc<Database>> {
    Ok(Arc::new(Database::open(url).await.map_err(std::io::Error::other)?))
}

/// A single node's durable history: the database, a record of whether the
/// last run stopped cleanly, and the write queue.
async fn open_persistence(url: &str, config: &Config, metrics: Arc<Metrics>) -> std::io::Result<Persistence> {
    let db = open_database(url).await?;
    let clean = db.begin_run(local::NODE, config.durable_acks).await.map_err(std::io::Error::other)?;
    if !clean && !config.durable_acks {
        tracing::warn!("the last run did not stop cleanly: every room starts a new epoch");
    }
    let writer = WriteBehind::start(db.clone(), config.persist_queue, metrics);
    Ok(Persistence { db, writer, durable_acks: config.durable_acks })
}

async fn accept_loop(state: Arc<ServerState>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = state.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                state.tasks.spawn(serve_http(state.clone(), stream));
            }
            Err(e) => {
                // Out of file descriptors, most likely: back off rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_http(state: Arc<ServerState>, stream: TcpStream) {
    let service_state = state.clone();
    let service = service_fn(move |req| http::handle(service_state.clone(), req));
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
