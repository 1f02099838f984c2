//! Redis key, channel and payload names, all under `--redis-prefix`.
//!
//! Every key of a room is built from its tagged name (`room_tag`), so the
//! scripts, which touch several keys of a room, run on one slot of a Redis
//! Cluster. With one Redis the tag is the room itself: `{team-a:x}`.
//!
//! On a Redis Cluster rooms are spread over [`PARTITIONS`] partitions (a
//! stable hash of the name), and the tag is the partition's:
//! `{p1017}team-a:x`. A partition's persist stream, writer lease and ack
//! channels carry the same tag, so the publish script queues a message for
//! the database in the same atomic step that gives it its seq, as with one
//! Redis. Each partition's tag is chosen so that the partitions' slots are
//! spread evenly over the 16,384 slots, and so over the shards. The room's
//! channel carries its tag too, so the script can `SPUBLISH` to it and a
//! node `SSUBSCRIBE`s to it on the shard that holds the room.

use std::sync::OnceLock;

use crate::room::RoomName;

#[derive(Clone)]
pub struct Keys {
    prefix: String,
    channel_prefix: String,
    acks_prefix: String,
    /// Redis Cluster: sharded channels, tagged with the room.
    cluster: bool,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            channel_prefix: format!("{prefix}:room:"),
            acks_prefix: format!("{prefix}:acks:"),
            cluster: false,
        }
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

    /// The room's tagged name, which every key of `room` is built from
    /// (`{prefix}:{tagged}:suffix`), so that one script call touches one
    /// slot on a Redis Cluster: `{room}` with one Redis, `{ptag}room` (the
    /// tag of the room's partition, then the name) on a cluster. It names
    /// the room uniquely either way. Keys of a room kept elsewhere
    /// (presence) must be built with it too.
    pub fn room_tag(&self, room: &RoomName) -> String {
        if self.cluster {
            cluster_room_tag(room)
        } else {
            format!("{{{room}}}")
        }
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

    /// The room's channel; on a cluster a shard channel in the room's slot.
    pub fn channel(&self, room: &RoomName) -> String {
        if self.cluster {
            format!("{}{}", self.channel_prefix, cluster_room_tag(room))
        } else {
            format!("{}{room}", self.channel_prefix)
        }
    }

    pub fn room_of_channel(&self, channel: &str) -> Option<RoomName> {
        let name = channel.strip_prefix(&self.channel_prefix)?;
        if !self.cluster {
            return RoomName::parse(name).ok();
        }
        let (tag, name) = name.strip_prefix('{')?.split_once('}')?;
        let room = RoomName::parse(name).ok()?;
        (tag == partition_tag(partition_of(&room))).then_some(room)
    }

    /// The stream the publish script queues `room`'s messages on for the
    /// database: the one stream with one Redis, the stream of the room's
    /// partition on a cluster (in the room's slot).
    pub fn pending_for(&self, room: &RoomName) -> String {
        self.pending(self.partition(room))
    }

    /// The room's partition: always 0 with one Redis.
    pub fn partition(&self, room: &RoomName) -> u16 {
        if self.cluster {
            partition_of(room)
        } else {
            0
        }
    }

    /// The partitions whose streams the database writer reads: one with
    /// one Redis, [`PARTITIONS`] on a cluster.
    pub fn partitions(&self) -> u16 {
        if self.cluster {
            PARTITIONS
        } else {
            1
        }
    }

    /// A partition's stream of messages still to be written to the
    /// database, read by a consumer group that every node of the cluster
    /// belongs to. With one Redis there is one: `{prefix}:persist`.
    pub fn pending(&self, partition: u16) -> String {
        if self.cluster {
            format!("{}:{{{}}}:persist", self.prefix, partition_tag(partition))
        } else {
            format!("{}:persist", self.prefix)
        }
    }

    /// With `--durable-acks`: the channel where the database writer tells a
    /// node that a message of `partition` it published is committed and may
    /// be acked. With one Redis one per node; on a cluster one per node and
    /// partition, a shard channel in the partition's slot (the release
    /// script `SPUBLISH`es to it).
    pub fn acks(&self, partition: u16, node: &str) -> String {
        if self.cluster {
            format!("{}{{{}}}{node}", self.acks_prefix, partition_tag(partition))
        } else {
            format!("{}{node}", self.acks_prefix)
        }
    }

    /// Whether `channel` is one of `node`'s ack channels.
    pub fn is_ack_channel(&self, channel: &str, node: &str) -> bool {
        let Some(rest) = channel.strip_prefix(&self.acks_prefix) else { return false };
        if self.cluster {
            rest.strip_prefix('{').and_then(|r| r.split_once('}')).is_some_and(|(_, n)| n == node)
        } else {
            rest == node
        }
    }

    /// With `--durable-acks`: the lease of the one node that writes and
    /// releases a partition's messages (one writer keeps each room's
    /// releases in order). With one Redis there is one: `{prefix}:writer`.
    pub fn writer_lease(&self, partition: u16) -> String {
        if self.cluster {
            format!("{}:{{{}}}:writer", self.prefix, partition_tag(partition))
        } else {
            format!("{}:writer", self.prefix)
        }
    }

    /// The channel a node publishes its liveness probes to, and hears them on.
    pub fn probe(&self, node: &str) -> String {
        format!("{}:probe:{node}", self.prefix)
    }
}

/// On a Redis Cluster, how many partitions rooms are spread over. Part of
/// the data layout: every node of a cluster must agree, and changing it
/// moves every room to other keys (a new epoch, history in Redis lost). 64
/// balances up to 64 shards; each node's database writer polls each
/// partition's stream, so more partitions cost more idle commands.
pub const PARTITIONS: u16 = 64;

/// Redis Cluster's number of hash slots.
const SLOTS: u16 = 16384;

/// The partition of `room` on a cluster: a stable hash of its name.
pub fn partition_of(room: &RoomName) -> u16 {
    crc16(room.as_str().as_bytes()) % PARTITIONS
}

/// The hash tag (without braces) of partition `p`: the first of `p1`,
/// `p2`, ... whose slot lies in the `p`-th of [`PARTITIONS`] equal ranges
/// of slots, so partitions spread evenly over the slots (and the shards,
/// which own ranges of slots). Computed once; the same on every node.
pub fn partition_tag(partition: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let width = SLOTS / PARTITIONS;
        let mut tags: Vec<Option<String>> = vec![None; PARTITIONS as usize];
        let mut missing = tags.len();
        let mut n: u32 = 0;
        while missing > 0 {
            n += 1;
            let tag = format!("p{n}");
            let range = usize::from(slot(tag.as_bytes()) / width);
            if tags[range].is_none() {
                tags[range] = Some(tag);
                missing -= 1;
            }
        }
        tags.into_iter().flatten().collect()
    });
    &tags[usize::from(partition % PARTITIONS)]
}

/// The tagged name of `room` on a Redis Cluster, `{ptag}room`: the tag
/// decides the slot of every key of the room (see [`Keys::room_tag`]).
pub fn cluster_room_tag(room: &RoomName) -> String {
    format!("{{{}}}{room}", partition_tag(partition_of(room)))
}

/// The hash slot of a key without a hash tag, as Redis Cluster computes it.
fn slot(key: &[u8]) -> u16 {
    crc16(key) % SLOTS
}

/// CRC16-CCITT (XModem), the checksum of Redis Cluster's key slots.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
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
    fn single_redis_keeps_its_layout() {
        let keys = Keys::new("t1");
        let room = RoomName::parse("team-a:x").unwrap();
        assert_eq!(keys.room_tag(&room), "{team-a:x}");
        assert_eq!(keys.channel(&room), "t1:room:team-a:x");
        assert_eq!((keys.partition(&room), keys.partitions()), (0, 1));
        assert_eq!(keys.pending_for(&room), "t1:persist");
        assert_eq!(keys.writer_lease(0), "t1:writer");
        assert_eq!(keys.acks(0, "n1"), "t1:acks:n1");
        assert!(keys.is_ack_channel("t1:acks:n1", "n1"));
        assert!(!keys.is_ack_channel("t1:acks:n2", "n1"));
    }

    #[test]
    fn cluster_keys_and_channels_carry_the_partitions_hash_tag() {
        let keys = Keys::for_cluster("t1");
        let room = RoomName::parse("team-a:x").unwrap();
        let p = partition_of(&room);
        let tag = partition_tag(p);
        assert_eq!(keys.room_tag(&room), format!("{{{tag}}}team-a:x"));
        assert_eq!(keys.state(&room), format!("t1:{{{tag}}}team-a:x:state"));
        assert_eq!(keys.channel(&room), format!("t1:room:{{{tag}}}team-a:x"));
        assert_eq!(keys.room_of_channel(&keys.channel(&room)), Some(room.clone()));
        assert_eq!(keys.room_of_channel("t1:room:{team-a:x}"), None);
        assert_eq!(keys.room_of_channel("t1:room:{p0}team-a:x"), None);
        assert_eq!(keys.publish_command(), "SPUBLISH");
        assert_eq!(keys.pending_for(&room), format!("t1:{{{tag}}}:persist"));
        assert_eq!(keys.writer_lease(p), format!("t1:{{{tag}}}:writer"));
        assert_eq!(keys.acks(p, "n1"), format!("t1:acks:{{{tag}}}n1"));
        assert!(keys.is_ack_channel(&keys.acks(p, "n1"), "n1"));
        assert!(!keys.is_ack_channel(&keys.acks(p, "n1"), "n2"));
        assert_eq!(keys.partitions(), PARTITIONS);
    }

    #[test]
    fn slots_are_redis_clusters() {
        // From the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
    }

    #[test]
    fn partitions_spread_evenly_over_the_slots() {
        let width = SLOTS / PARTITIONS;
        let mut tags = std::collections::HashSet::new();
        for p in 0..PARTITIONS {
            let tag = partition_tag(p);
            assert_eq!(slot(tag.as_bytes()) / width, p, "partition {p}: {tag}");
            assert!(tags.insert(tag) && tag.len() <= 6, "{tag}");
        }
        // Three shards of equal slot ranges get a third of them each (give or take one).
        for shard in 0..3u32 {
            let (lo, hi) = (u32::from(SLOTS) * shard / 3, u32::from(SLOTS) * (shard + 1) / 3);
            let count =
                (0..PARTITIONS).filter(|p| (lo..hi).contains(&u32::from(slot(partition_tag(*p).as_bytes())))).count();
            assert!((20..=22).contains(&count), "shard {shard}: {count}");
        }
        // Rooms spread over the partitions.
        let mut used = std::collections::HashSet::new();
        for i in 0..1000 {
            used.insert(partition_of(&RoomName::parse(&format!("room-{i}")).unwrap()));
        }
        assert_eq!(used.len(), usize::from(PARTITIONS));
    }

    #[test]
    fn envelope_parses_and_refuses_garbage() {
        let e = Envelope::parse(b"12 ab12 {\"a\": 1}").unwrap();
        assert_eq!((e.seq, e.epoch, e.json), (12, "ab12", &b"{\"a\": 1}"[..]));
        assert!(Envelope::parse(b"x ab {}").is_none());
        assert!(Envelope::parse(b"12").is_none());
    }
}
