//! A TCP proxy between a server and its backend, for tests that cut the
//! backend off (or make it go silent) without touching the machine's own
//! Redis or PostgreSQL.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// One proxied connection: its pump tasks, and whether it stalls.
struct Link {
    pumps: Vec<AbortHandle>,
    frozen: Arc<AtomicBool>,
    /// The client sent SUBSCRIBE on it: it is a pub/sub connection.
    subscriber: Arc<AtomicBool>,
}

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    links: Mutex<Vec<Link>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, upstream, shared.clone())).abort_handle();
        Self { addr, shared, accept }
    }

    /// Closes every proxied connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for link in self.shared.links.lock().unwrap().drain(..) {
            link.pumps.iter().for_each(AbortHandle::abort);
        }
    }

    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Stops forwarding, both ways, on every open pub/sub connection, while
    /// keeping its sockets open: a connection that went silent.
    pub fn freeze_subscribers(&self) {
        for link in self.shared.links.lock().unwrap().iter() {
            if link.subscriber.load(Ordering::SeqCst) {
                link.frozen.store(true, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(server) = TcpStream::connect(upstream).await else { continue };
        let frozen = Arc::new(AtomicBool::new(false));
        let subscriber = Arc::new(AtomicBool::new(false));
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let up = tokio::spawn(pump(client_read, server_write, frozen.clone(), Some(subscriber.clone())));
        let down = tokio::spawn(pump(server_read, client_write, frozen.clone(), None));
        let link = Link { pumps: vec![up.abort_handle(), down.abort_handle()], frozen, subscriber };
        shared.links.lock().unwrap().push(link);
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    subscriber: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(flag) = &subscriber {
            if buf[..n].windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE")) {
                flag.store(true, Ordering::SeqCst);
            }
        }
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything from now on, answering nothing.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
