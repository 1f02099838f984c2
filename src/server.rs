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

use crate::admin::{self, Admin};
use crate::bus::redis::{RedisBus, RedisSettings};
use crate::bus::{fresh_epoch, local, Bus, Persistence};
use crate::config::Config;
use crate::conn::{coalesce, Connection};
use crate::history::writer::WriteBehind;
use crate::history::Database;
use crate::http::Face;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::state::ServerState;
use crate::tls::Tls;
use crate::{eviction, http, liveness};

/// Pending connections the kernel holds for us during a connection storm.
const LISTEN_BACKLOG: i32 = 4096;

/// How a server stops (see [`Server::drain`]).
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// `/readyz` answers 503 this long before anything closes.
    pub period: Duration,
    /// The 1001 closes are spread over this long.
    pub spread: Duration,
    /// Then at most this long for connections to finish, and again for history.
    pub grace: Duration,
}

/// A running server.
pub struct Server {
    state: Arc<ServerState>,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// The public accept loops: plain, or TLS and the loopback one behind it.
    accept: Vec<JoinHandle<()>>,
    tls: Option<Arc<Tls>>,
    admin_accept: Option<JoinHandle<()>>,
    sweep: JoinHandle<()>,
}

impl Server {
    /// Binds the listener and starts serving.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        let listener = bind(config.listen)?;
        let local_addr = listener.local_addr()?;
        let admin_listener = config.admin_listen.map(bind).transpose()?;
        let admin_addr = admin_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let tls = match &config.tls {
            Some((cert, key)) => Some(Arc::new(Tls::load(cert, key).map_err(std::io::Error::other)?)),
            None => None,
        };
        let state = Arc::new(build_state(config).await?);
        // Bans first: a restarted node refuses a banned user from its first request.
        admin::cluster::load_at_start(&state).await;
        // Ends by itself at shutdown.
        tokio::spawn(admin::cluster::run(state.clone()));
        let accept = match &tls {
            None => vec![tokio::spawn(accept_loop(state.clone(), listener, Face::Public))],
            Some(tls) => {
                // TLS is terminated here and relayed to a private plain listener (see `tls`).
                let plain = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                let plain_addr = plain.local_addr()?;
                vec![
                    tokio::spawn(accept_loop(state.clone(), plain, Face::Public)),
                    tokio::spawn(tls_accept_loop(state.clone(), listener, tls.clone(), plain_addr)),
                ]
            }
        };
        let admin_accept = admin_listener.map(|l| tokio::spawn(accept_loop(state.clone(), l, Face::Admin)));
        let sweep = tokio::spawn(liveness::run(state.clone()));
        // Ends by itself at shutdown.
        tokio::spawn(coalesce::run(state.writer.clone(), state.shutdown.clone()));
        // Ends by itself at shutdown; nothing waits for it.
        tokio::spawn(eviction::run(state.clone(), state.config.history_ttl));
        Ok(Self { state, local_addr, admin_addr, accept, tls, admin_accept, sweep })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The listener's TLS, for a task that reloads it on SIGHUP.
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    /// Where the admin listener (`--admin-listen`) is bound, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Stops accepting, closes every connection with 1001 after what is
    /// already queued, and waits up to `grace` for them to finish.
    pub async fn shutdown(self, grace: Duration) {
        let plan = Drain { period: Duration::ZERO, spread: Duration::ZERO, grace };
        self.drain(plan, std::future::pending()).await;
    }

    /// A rolling deploy's stop: `/readyz` answers 503 for `plan.period`
    /// while clients are still served, then the public listener stops
    /// accepting and the open connections are closed with 1001 spread
    /// evenly over `plan.spread`, so their reconnects reach the other nodes
    /// as a ramp. When `hurry` ends (a second signal) whatever is left of
    /// both is skipped and every connection is closed at once. Then, as
    /// always, up to `plan.grace` for the connections to finish and for the
    /// history owed to the database.
    pub async fn drain(self, plan: Drain, hurry: impl std::future::Future<Output = ()>) {
        let (state, grace) = (self.state, plan.grace);
        let mut hurry = std::pin::pin!(hurry);
        let mut hurried = false;
        state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        if !plan.period.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(plan.period) => {}
                () = &mut hurry => hurried = true,
            }
        }
        state.stop_accepting.cancel();
        for accept in self.accept {
            let _ = accept.await;
        }
        if !hurried && !plan.spread.is_zero() {
            let open: Vec<Arc<Connection>> = state.connections.iter().map(|c| c.value().clone()).collect();
            let started = tokio::time::Instant::now();
            for (i, conn) in open.iter().enumerate() {
                // The i-th of n closes at i/n of the spread.
                let due = started + plan.spread.mul_f64(i as f64 / open.len() as f64);
                if !hurried {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        () = &mut hurry => hurried = true,
                    }
                }
                conn.close(1001, "going away");
            }
        }
        if hurried {
            tracing::warn!("second signal: closing every connection now");
        }
        state.shutdown.cancel();
        if let Some(admin) = self.admin_accept {
            let _ = admin.await;
        }
        let _ = self.sweep.await;
        // Everyone left, those the spread did not reach included.
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
    // Bans and disconnects reach the other nodes through the bus's Redis.
    let admin = Admin::new(bus.redis_access(), &config.redis_prefix);
    Ok(ServerState::new(config, bus, admin, metrics, shutdown))
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

async fn accept_loop(state: Arc<ServerState>, listener: TcpListener, face: Face) {
    // The admin listener serves probes and metrics until the very end.
    let stop = match face {
        Face::Public => state.stop_accepting.clone(),
        Face::Admin => state.shutdown.clone(),
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                state.tasks.spawn(serve_http(state.clone(), stream, face));
            }
            Err(e) => {
                // Out of file descriptors, most likely: back off rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_http(state: Arc<ServerState>, stream: TcpStream, face: Face) {
    let service_state = state.clone();
    let service = service_fn(move |req| http::handle(service_state.clone(), face, req));
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

/// Accepts TLS clients on the public address: each one's handshake, then its
/// plaintext relayed to the server's private plain listener at `plain`.
async fn tls_accept_loop(state: Arc<ServerState>, listener: TcpListener, tls: Arc<Tls>, plain: SocketAddr) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = state.stop_accepting.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                state.tasks.spawn(relay_tls(stream, tls.acceptor().clone(), plain));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn relay_tls(stream: TcpStream, acceptor: tokio_rustls::TlsAcceptor, plain: SocketAddr) {
    let mut secure = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(secure)) => secure,
        Ok(Err(e)) => return tracing::debug!("TLS handshake failed: {e}"),
        Err(_) => return tracing::debug!("TLS handshake timed out"),
    };
    let mut inner = match TcpStream::connect(plain).await {
        Ok(inner) => inner,
        Err(e) => return tracing::warn!("cannot reach the plain listener behind TLS: {e}"),
    };
    let _ = inner.set_nodelay(true);
    // Ends when both sides have closed: the server's close frame and FIN
    // travel out as close_notify, the client's close back as FIN.
    let _ = tokio::io::copy_bidirectional(&mut secure, &mut inner).await;
}
