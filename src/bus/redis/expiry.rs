//! Keeps the Redis keys of rooms this node has members in from expiring.
//!
//! A room's keys live for `--history-ttl` after its last publish or join
//! (the scripts renew them), so Redis forgets rooms nobody uses, however
//! many a client touched. A room whose members are quiet for longer than
//! that is still in use: every third of the TTL this task renews the keys
//! of every room with local members, in pipelines, off the publish path.
//! A room whose keys expired anyway behaves as one whose Redis data was
//! lost: a new epoch, or the database's sequence (see `scripts`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::scripts::Scripts;
use crate::registry::Registry;

/// Rooms renewed per pipeline.
const CHUNK: usize = 500;

pub async fn run(scripts: Arc<Scripts>, registry: Arc<Registry>, shutdown: CancellationToken) {
    let ttl = Duration::from_millis(scripts.key_ttl_ms);
    let mut ticks = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let rooms = registry.subscribed_rooms();
        if scripts.keys.is_cluster() {
            renew_on_cluster(&scripts, &rooms).await;
            continue;
        }
        for chunk in rooms.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for (room, _) in chunk {
                pipe.cmd("PEXPIRE").arg(scripts.keys.state(room)).arg(scripts.key_ttl_ms).ignore();
                pipe.cmd("PEXPIRE").arg(scripts.keys.history(room)).arg(scripts.key_ttl_ms).ignore();
            }
            if let Err(e) = scripts.link.run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await {
                // The next tick tries again; a third of the TTL is left.
                tracing::warn!("could not renew the Redis keys of rooms with members: {e}");
                break;
            }
        }
    }
}

/// On a Redis Cluster a pipeline may not cross slots: one command per key,
/// a chunk of them in flight at once (the cluster connection pipelines them
/// per shard).
async fn renew_on_cluster(scripts: &Scripts, rooms: &[(crate::room::RoomName, Option<u64>)]) {
    for chunk in rooms.chunks(CHUNK) {
        let renewals =
            chunk.iter().flat_map(|(room, _)| [scripts.keys.state(room), scripts.keys.history(room)]).map(|key| {
                scripts.link.run(move |mut conn| async move {
                    redis::cmd("PEXPIRE").arg(key).arg(scripts.key_ttl_ms).query_async::<()>(&mut conn).await
                })
            });
        let failed = futures_util::future::join_all(renewals).await.into_iter().filter(Result::is_err).count();
        if failed > 0 {
            // The next tick tries again; a third of the TTL is left.
            tracing::warn!("could not renew {failed} Redis keys of rooms with members");
            return;
        }
    }
}
