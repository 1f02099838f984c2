//! With `--redis-cluster`: sharded channels for what runs beside the bus
//! (presence notices, admin announcements), on a cluster connection of
//! their own.
//!
//! A connection of their own, because redis-rs sends every push of a
//! cluster connection to one receiver: kept apart, the bus never sees
//! these channels and they never see the rooms' messages, and nothing but
//! subscribe commands travel on it (an unsolicited `sunsubscribe` can then
//! be paired with no other command's reply).
//!
//! The channels follow the cluster as the bus's rooms do (`shards.rs`): a
//! slot that moves away ends its subscriptions with a `sunsubscribe` push,
//! and a lost connection may lose them all; either way the channels are
//! subscribed again at once, and retried every second until a shard
//! confirms. Each confirmation is reported, so the owner can read again
//! what it may have missed while it was not subscribed.

use std::collections::HashSet;
use std::time::Duration;

use redis::{PushInfo, PushKind, RedisResult};
use tokio::sync::mpsc;
use tokio::time::Interval;

use super::link::{cluster_client, CommandLink, Conn};
use super::shards::{bytes, text};

/// How often subscriptions that failed are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// What the subscriptions bring.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelEvent {
    /// A message on a subscribed channel.
    Message { channel: String, payload: Vec<u8> },
    /// The channel is subscribed now (first time or again): whatever was
    /// published on it before may have been missed.
    Subscribed(String),
}

pub struct ShardChannels {
    link: CommandLink,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// Channels the owner wants.
    wanted: HashSet<String>,
    /// Wanted channels to subscribe (again) at the next retry.
    failed: HashSet<String>,
    retry: Interval,
}

impl ShardChannels {
    /// A cluster connection of their own to the cluster at `seeds`; it
    /// connects on first use.
    pub fn open(seeds: &str) -> RedisResult<Self> {
        let (pushes, push_rx) = mpsc::unbounded_channel();
        let link = CommandLink::cluster(cluster_client(seeds, Some(pushes))?);
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self { link, pushes: push_rx, wanted: HashSet::new(), failed: HashSet::new(), retry })
    }

    /// Subscribes `channel` on the shard that owns its slot; whether that
    /// worked now (if not, it is retried every second).
    pub async fn subscribe(&mut self, channel: &str) -> bool {
        self.wanted.insert(channel.to_owned());
        self.try_subscribe(channel).await
    }

    pub async fn unsubscribe(&mut self, channel: &str) {
        self.wanted.remove(channel);
        self.failed.remove(channel);
        if let Err(e) = self.command("SUNSUBSCRIBE", channel).await {
            tracing::debug!("sunsubscribe {channel}: {e}");
        }
    }

    /// Waits for the next message or confirmation, subscribing again what
    /// was lost meanwhile. Cancel-safe: a push is handled without waiting,
    /// and a channel leaves the retry set only once its subscription worked.
    pub async fn next(&mut self) -> Option<ChannelEvent> {
        loop {
            tokio::select! {
                push = self.pushes.recv() => {
                    if let Some(event) = self.on_push(push?) {
                        return Some(event);
                    }
                }
                _ = self.retry.tick(), if !self.failed.is_empty() => self.retry_failed().await,
            }
        }
    }

    fn on_push(&mut self, push: PushInfo) -> Option<ChannelEvent> {
        let channel = push.data.first().and_then(text);
        match (push.kind, channel) {
            (PushKind::SMessage, Some(channel)) if self.wanted.contains(&channel) => {
                let payload = push.data.get(1).and_then(bytes)?.to_vec();
                Some(ChannelEvent::Message { channel, payload })
            }
            (PushKind::SSubscribe, Some(channel)) if self.wanted.contains(&channel) => {
                Some(ChannelEvent::Subscribed(channel))
            }
            (PushKind::SUnsubscribe, Some(channel)) if self.wanted.contains(&channel) => {
                // Not ours (ours left `wanted` first): the slot moved away.
                tracing::info!("channel {channel} moved to another shard: subscribing there");
                self.failed.insert(channel);
                self.retry.reset_immediately();
                None
            }
            (PushKind::Disconnection, _) if !self.wanted.is_empty() => {
                // redis-rs resubscribes by itself, but not always after a
                // failover (see `shards.rs`): subscribe every channel again.
                tracing::warn!("a redis cluster connection was lost: subscribing every channel again");
                self.failed.extend(self.wanted.iter().cloned());
                self.retry.reset_immediately();
                None
            }
            _ => None,
        }
    }

    /// Subscribes every failed channel again, all at once: during a
    /// failover each may wait for a response timeout, and they should not
    /// wait one after another.
    async fn retry_failed(&mut self) {
        let failed: Vec<String> = self.failed.iter().cloned().collect();
        let tries = failed.iter().map(|channel| self.command("SSUBSCRIBE", channel));
        let results = futures_util::future::join_all(tries).await;
        let mut first_error = None;
        for (channel, result) in failed.iter().zip(results) {
            match result {
                Ok(()) => {
                    self.failed.remove(channel);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            tracing::warn!("cannot subscribe {} channel(s) yet: {e}", self.failed.len());
        }
    }

    async fn try_subscribe(&mut self, channel: &str) -> bool {
        match self.command("SSUBSCRIBE", channel).await {
            Ok(()) => {
                self.failed.remove(channel);
                true
            }
            Err(e) => {
                tracing::warn!("cannot subscribe {channel}: {e}");
                self.failed.insert(channel.to_owned());
                false
            }
        }
    }

    /// `SSUBSCRIBE` or `SUNSUBSCRIBE` one channel on the shard of its slot.
    async fn command(&self, command: &str, channel: &str) -> RedisResult<()> {
        let Conn::Cluster(mut conn) = self.link.get().await? else {
            return Err(redis::RedisError::from(std::io::Error::other("not a cluster connection")));
        };
        match command {
            "SSUBSCRIBE" => conn.ssubscribe(channel).await,
            _ => conn.sunsubscribe(channel).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(kind: PushKind, data: &[&[u8]]) -> PushInfo {
        PushInfo { kind, data: data.iter().map(|d| redis::Value::BulkString(d.to_vec())).collect() }
    }

    #[tokio::test]
    async fn pushes_become_events_and_lost_subscriptions_are_made_again() {
        // Nothing listens there: the client connects on first use only.
        let mut channels = ShardChannels::open("redis://127.0.0.1:1").unwrap();
        channels.wanted.insert("a".to_owned());
        let message = ChannelEvent::Message { channel: "a".to_owned(), payload: b"hi".to_vec() };
        assert_eq!(channels.on_push(push(PushKind::SMessage, &[b"a", b"hi"])), Some(message));
        assert_eq!(channels.on_push(push(PushKind::SMessage, &[b"b", b"hi"])), None, "not wanted");
        assert_eq!(
            channels.on_push(push(PushKind::SSubscribe, &[b"a"])),
            Some(ChannelEvent::Subscribed("a".to_owned()))
        );
        assert!(channels.failed.is_empty());
        // The slot moved away: subscribed again.
        assert_eq!(channels.on_push(push(PushKind::SUnsubscribe, &[b"a"])), None);
        assert!(channels.failed.contains("a"));
        channels.failed.clear();
        assert_eq!(channels.on_push(push(PushKind::SUnsubscribe, &[b"b"])), None);
        assert!(channels.failed.is_empty(), "an unsubscribe of ours is not followed");
        // A lost connection: every channel again.
        assert_eq!(channels.on_push(push(PushKind::Disconnection, &[])), None);
        assert!(channels.failed.contains("a"));
        // Which the next call tries at once (and, with no cluster there, keeps for later).
        let next = tokio::time::timeout(Duration::from_millis(200), channels.next()).await;
        assert!(next.is_err(), "no event without a cluster");
        assert!(channels.failed.contains("a"));
    }
}
