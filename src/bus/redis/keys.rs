//! Redis key, channel and payload names, all under `--redis-prefix`.
//!
//! A room's keys share a hash tag (`{room}`) so the publish script, which
//! touches several of them, also runs on Redis Cluster. There the room's
//! channel carries the same tag, so the script can `SPUBLISH` to it and a
//! node `SSUBSCRIBE`s to it on the shard that holds the room.

use crate::room::RoomName;

#[derive(Clone)]
pub struct Keys {
    prefix: String,
    channel_prefix: String,
    /// Redis Cluster: sharded channels, tagged with the room.
    cluster: bool,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), channel_prefix: format!("{prefix}:room:"), cluster: false }
    }

    /// Names for a Redis Cluster: room channels are shard channels in the
    /// room's slot.
    pub fn for_cluster(prefix: &str) -> Self {
        Self { cluster: true, ..Self::new(prefix) }
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The command that publishes to a room's channel.
    pub fn publish_command(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The hash tag every key of `room` carries (`{room}`), so that one
    /// script call touches one slot on a Redis Cluster. Keys of a room kept
    /// elsewhere (presence) must be built with it too.
    pub fn room_tag(&self, room: &RoomName) -> String {
        format!("{{{room}}}")
    }

    /// A hash with the room's `seq` and `epoch`: one key, so it is lost or
    /// kept as a whole and a `seq` can never restart inside an epoch.
    pub fn state(&self, room: &RoomName) -> String {
        format!("{}:{}:state", self.prefix, self.room_tag(room))
    }

    /// A sorted set of the room's recent messages, scored by `seq`.
    pub fn history(&self, room: &RoomName) -> String {
        format!("{}:{}:history", self.prefix, self.room_tag(room))
    }

    pub fn channel(&self, room: &RoomName) -> String {
        if self.cluster {
            format!("{}{{{room}}}", self.channel_prefix)
        } else {
            format!("{}{room}", self.channel_prefix)
        }
    }

    pub fn room_of_channel(&self, channel: &str) -> Option<RoomName> {
        let name = channel.strip_prefix(&self.channel_prefix)?;
        let name = if self.cluster { name.strip_prefix('{')?.strip_suffix('}')? } else { name };
        RoomName::parse(name).ok()
    }

    /// The stream key the publish script names for `room`. On a cluster
    /// every key a script names must be in the room's slot; there is no
    /// database there (yet), so the script never touches it and the room's
    /// state key stands in.
    pub fn pending_for(&self, room: &RoomName) -> String {
        if self.cluster {
            self.state(room)
        } else {
            self.pending()
        }
    }

    /// The stream of messages still to be written to the database, read by
    /// a consumer group that every node of the cluster belongs to.
    pub fn pending(&self) -> String {
        format!("{}:persist", self.prefix)
    }

    /// With `--durable-acks`: the channel where the database writer tells a
    /// node that a message it published is committed and may be acked.
    pub fn acks(&self, node: &str) -> String {
        format!("{}:acks:{node}", self.prefix)
    }

    /// With `--durable-acks`: the lease of the one node that writes and
    /// releases messages (one writer keeps each room's releases in order).
    pub fn writer_lease(&self) -> String {
        format!("{}:writer", self.prefix)
    }

    /// The channel a node publishes its liveness probes to, and hears them on.
    pub fn probe(&self, node: &str) -> String {
        format!("{}:probe:{node}", self.prefix)
    }
}

/// A published message as it travels on a channel: `"<seq> <epoch> <json>"`.
pub struct Envelope<'a> {
    pub seq: u64,
    pub epoch: &'a str,
    pub json: &'a [u8],
}

impl<'a> Envelope<'a> {
    pub fn parse(payload: &'a [u8]) -> Option<Self> {
        let mut parts = payload.splitn(3, |b| *b == b' ');
        let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let epoch = std::str::from_utf8(parts.next()?).ok()?;
        let json = parts.next()?;
        Some(Self { seq, epoch, json })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_channels_round_trip() {
        let keys = Keys::new("t1");
        let room = RoomName::parse("team-a:x").unwrap();
        assert_eq!(keys.state(&room), "t1:{team-a:x}:state");
        assert_eq!(keys.history(&room), "t1:{team-a:x}:history");
        assert_eq!(keys.room_of_channel(&keys.channel(&room)), Some(room));
        assert_eq!(keys.room_of_channel("other:room:x"), None);
    }

    #[test]
    fn cluster_channels_carry_the_rooms_hash_tag() {
        let keys = Keys::for_cluster("t1");
        let room = RoomName::parse("team-a:x").unwrap();
        assert_eq!(keys.channel(&room), "t1:room:{team-a:x}");
        assert_eq!(keys.room_of_channel(&keys.channel(&room)), Some(room.clone()));
        assert_eq!(keys.room_of_channel("t1:room:team-a:x"), None);
        assert_eq!(keys.publish_command(), "SPUBLISH");
        assert_eq!(keys.pending_for(&room), keys.state(&room));
        assert_eq!(Keys::new("t1").pending_for(&room), "t1:persist");
    }

    #[test]
    fn envelope_parses_and_refuses_garbage() {
        let e = Envelope::parse(b"12 ab12 {\"a\": 1}").unwrap();
        assert_eq!((e.seq, e.epoch, e.json), (12, "ab12", &b"{\"a\": 1}"[..]));
        assert!(Envelope::parse(b"x ab {}").is_none());
        assert!(Envelope::parse(b"12").is_none());
    }
}
