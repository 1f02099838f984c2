//! The PostgreSQL store: one connection, replaced when it breaks, and the
//! few queries chorus needs.
//!
//! tokio-postgres pipelines concurrent queries on one connection, so the
//! batch writer and history reads share it without a pool.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::protocol::outbound;
use crate::registry::StoredMessage;
use crate::room::RoomName;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A message as the database keeps it.
#[derive(Debug, Clone)]
pub struct PersistedMessage {
    pub room: RoomName,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub from: Arc<str>,
    pub ts_millis: u64,
    /// The body's exact JSON text.
    pub body: String,
}

/// Why the database could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database: connect timed out")]
    ConnectTimeout,
}

pub struct Database {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl Database {
    /// Connects and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self, DbError> {
        let db = Self { url: url.to_owned(), client: Mutex::new(None) };
        let mut client = db.connect().await?;
        super::migrations::run(&mut client).await?;
        *db.client.lock() = Some(Arc::new(client));
        Ok(db)
    }

    async fn connect(&self) -> Result<Client, DbError> {
        let connecting = tokio_postgres::connect(&self.url, NoTls);
        let (client, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, connecting).await.map_err(|_| DbError::ConnectTimeout)??;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("database connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// The current connection, or a new one if it broke.
    async fn client(&self) -> Result<Arc<Client>, DbError> {
        if let Some(client) = self.client.lock().as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Arc::new(self.connect().await?);
        *self.client.lock() = Some(client.clone());
        Ok(client)
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Writes a batch in one transaction; rows already there are left alone,
    /// so a batch may be written twice. Rooms' epochs follow their messages.
    pub async fn write_batch(&self, batch: &[PersistedMessage]) -> Result<(), DbError> {
        let rooms: Vec<&str> = batch.iter().map(|m| m.room.as_str()).collect();
        let seqs: Vec<i64> = batch.iter().map(|m| m.seq as i64).collect();
        let epochs: Vec<&str> = batch.iter().map(|m| &*m.epoch).collect();
        let senders: Vec<&str> = batch.iter().map(|m| &*m.from).collect();
        let ts: Vec<i64> = batch.iter().map(|m| m.ts_millis as i64).collect();
        let bodies: Vec<&str> = batch.iter().map(|m| m.body.as_str()).collect();
        let client = self.client().await?;
        client
            .execute(
                "WITH batch AS (
                    SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[])
                        WITH ORDINALITY AS b(room, seq, epoch, sender, ts, body, i)
                 ), stored AS (
                    INSERT INTO messages (room, seq, sender, ts, body)
                    SELECT room, seq, sender, timestamptz 'epoch' + ts * interval '1 millisecond', body::json
                    FROM batch
                    ON CONFLICT (room, seq) DO NOTHING
                 )
                 INSERT INTO rooms (room, epoch)
                 SELECT DISTINCT ON (room) room, epoch FROM batch ORDER BY room, i DESC
                 ON CONFLICT (room) DO UPDATE SET epoch = excluded.epoch WHERE rooms.epoch <> excluded.epoch",
                &[&rooms, &seqs, &epochs, &senders, &ts, &bodies],
            )
            .await?;
        Ok(())
    }

    /// The room's highest stored seq and its epoch, if the room is known.
    pub async fn room_state(&self, room: &RoomName) -> Result<(u64, Option<String>), DbError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT coalesce((SELECT max(seq) FROM messages WHERE room = $1), 0),
                        (SELECT epoch FROM rooms WHERE room = $1)",
                &[&room.as_str()],
            )
            .await?;
        Ok((row.try_get::<_, i64>(0)? as u64, row.try_get(1)?))
    }

    /// Records the epoch a room starts with, unless it has one; returns the
    /// room's epoch.
    pub async fn adopt_epoch(&self, room: &RoomName, epoch: &str) -> Result<String, DbError> {
        let row = self
            .client()
            .await?
            .query_one(
                "WITH added AS (
                    INSERT INTO rooms (room, epoch) VALUES ($1, $2) ON CONFLICT (room) DO NOTHING RETURNING epoch
                 )
                 SELECT epoch FROM added UNION ALL SELECT epoch FROM rooms WHERE room = $1 LIMIT 1",
                &[&room.as_str(), &epoch],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Up to `limit` messages before `before`, oldest first.
    pub async fn history_before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, DbError> {
        let before = before.map_or(i64::MAX, |b| b as i64);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, sender, (extract(epoch FROM ts) * 1000)::bigint, body::text FROM messages
                 WHERE room = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                &[&room.as_str(), &before, &(limit as i64)],
            )
            .await?;
        let mut messages = rows.iter().map(|row| stored(room, row)).collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    /// Up to `limit` messages after `since`, oldest first.
    pub async fn messages_after(
        &self,
        room: &RoomName,
        since: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, sender, (extract(epoch FROM ts) * 1000)::bigint, body::text FROM messages
                 WHERE room = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&room.as_str(), &(since as i64), &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(|row| stored(room, row)).collect::<Result<Vec<_>, _>>()?)
    }

    /// Marks a single node as running; returns whether its last run ended
    /// cleanly. After an unclean end every room starts a new epoch, since
    /// messages members saw may not have reached the database, unless
    /// `delivered_only_when_written` (`--durable-acks`) says they all did.
    pub async fn begin_run(&self, node: &str, delivered_only_when_written: bool) -> Result<bool, DbError> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT clean FROM nodes WHERE name = $1", &[&node]).await?;
        let clean = match row {
            Some(row) => row.try_get(0)?,
            None => true,
        };
        if !clean && !delivered_only_when_written {
            client.execute("UPDATE rooms SET epoch = md5(random()::text || room)", &[]).await?;
        }
        client
            .execute(
                "INSERT INTO nodes (name, clean) VALUES ($1, false) ON CONFLICT (name) DO UPDATE SET clean = false",
                &[&node],
            )
            .await?;
        Ok(clean)
    }

    /// Marks a single node as stopped with everything written.
    pub async fn end_run(&self, node: &str) -> Result<(), DbError> {
        self.client().await?.execute("UPDATE nodes SET clean = true WHERE name = $1", &[&node]).await?;
        Ok(())
    }
}

/// A row of `seq, sender, ts (ms), body` as the frame members would get.
fn stored(room: &RoomName, row: &tokio_postgres::Row) -> Result<StoredMessage, tokio_postgres::Error> {
    let seq = row.try_get::<_, i64>(0)? as u64;
    let sender: &str = row.try_get(1)?;
    let ts = row.try_get::<_, i64>(2)? as u64;
    let body: &str = row.try_get(3)?;
    Ok(StoredMessage::new(seq, outbound::message(room, seq, sender, ts, body.as_bytes())))
}
