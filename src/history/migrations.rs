//! Schema migrations, embedded in the binary and applied at start.
//!
//! Each migration runs once, in its own transaction, recorded in
//! `chorus_migrations`; an advisory lock keeps nodes that start together
//! from applying the same one twice.

use tokio_postgres::Client;

/// (version, SQL), in order. Append only: an applied migration never changes.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("migrations/0001_messages.sql"))];

/// Any number that no other application of the database uses as an advisory lock.
const LOCK_KEY: i64 = 0x6368_6f72_7573;

pub async fn run(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await?;
    let applied = apply_pending(client).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await?;
    applied
}

async fn apply_pending(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS chorus_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let row = client.query_one("SELECT coalesce(max(version), 0) FROM chorus_migrations", &[]).await?;
    let current: i32 = row.get(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO chorus_migrations (version) VALUES ($1)", &[version]).await?;
        tx.commit().await?;
        tracing::info!("applied database migration {version}");
    }
    Ok(())
}
