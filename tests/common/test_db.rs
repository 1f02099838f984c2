//! A PostgreSQL database of one test's own, on the machine's server
//! (`CHORUS_TEST_DATABASE_URL`): created empty, read back to check what
//! chorus stored, dropped at the end. Included with `#[path]` by the test
//! files that need a database, next to `mod common`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{test_database_url, with_database, GUARD};

pub struct TestDb {
    pub name: String,
    /// The URL chorus is given: the test's database on the same server.
    pub url: String,
}

impl TestDb {
    /// A new empty database; `tag` names the test file in its name.
    pub async fn create(tag: &str) -> Self {
        let name = format!("chorus_test_{tag}_{}_{:08x}", std::process::id(), rand::random::<u32>());
        connect(&test_database_url()).await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let url = with_database(&test_database_url(), &name);
        Self { name, url }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The stored seqs of `room`, in order; none before chorus created its
    /// schema. Any other error fails the test.
    pub async fn seqs(&self, room: &str) -> Vec<u64> {
        match self.client().await.query("SELECT seq FROM messages WHERE room = $1 ORDER BY seq", &[&room]).await {
            Ok(rows) => rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect(),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Vec::new(),
            Err(e) => panic!("reading the stored seqs of {room}: {e}"),
        }
    }

    /// Waits until `room` has at least `count` rows (write-behind may lag a
    /// moment); returns its seqs. Fails the test at the deadline.
    pub async fn wait_rows(&self, room: &str, count: usize) -> Vec<u64> {
        self.wait_until(room, |seqs| {
            if seqs.len() >= count {
                Ok(())
            } else {
                Err(format!("{} of {count} rows: {seqs:?}", seqs.len()))
            }
        })
        .await
    }

    /// Waits until every seq of `wanted` is stored (messages may be claimed
    /// from a dead node a few seconds later); returns what is stored. Fails
    /// the test at the deadline, naming what is missing.
    pub async fn wait_for(&self, room: &str, wanted: &[u64]) -> BTreeSet<u64> {
        let stored = self
            .wait_until(room, |seqs| {
                let missing: Vec<u64> = wanted.iter().copied().filter(|s| !seqs.contains(s)).collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("seqs {missing:?} still not stored"))
                }
            })
            .await;
        stored.into_iter().collect()
    }

    /// Reads `room`'s stored seqs until `ready` accepts them, and returns
    /// them; at the deadline fails the test with what `ready` said is
    /// missing.
    async fn wait_until(&self, room: &str, ready: impl Fn(&[u64]) -> Result<(), String>) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + GUARD * 3;
        loop {
            let seqs = self.seqs(room).await;
            match ready(&seqs) {
                Ok(()) => return seqs,
                Err(missing) => {
                    assert!(tokio::time::Instant::now() < deadline, "{room}: {missing} after {:?}", GUARD * 3)
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn drop(self) {
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = connect(&test_database_url()).await.batch_execute(&drop).await;
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The PostgreSQL server's address, for a TCP proxy in front of it.
pub fn postgres_addr() -> SocketAddr {
    let url = test_database_url();
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, rest)| rest);
    let host_port = after_at.trim_start_matches("postgres://").split('/').next().unwrap_or("127.0.0.1:5432");
    let host_port = if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5432") };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port).unwrap().next().unwrap()
}
