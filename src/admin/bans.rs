//! Users banned by the admin API, until when: checked on every token, before
//! any upgrade or HTTP API call, so the check is a map lookup in memory. In
//! a cluster every node holds the same bans: Redis keeps them (with expiry)
//! and announces new ones (see [`super::cluster`]).

use std::sync::Arc;

use dashmap::DashMap;

#[derive(Default)]
pub struct Bans {
    /// `sub` to the end of its ban, Unix milliseconds.
    until: DashMap<Arc<str>, u64>,
}

impl Bans {
    /// Bans `sub` until `until_ms`; a longer ban already in force is kept.
    pub fn ban(&self, sub: &str, until_ms: u64) {
        let mut entry = self.until.entry(sub.into()).or_insert(until_ms);
        *entry = (*entry).max(until_ms);
    }

    /// When the ban of `sub` ends, if it is banned at `now_ms`. An ended ban
    /// is forgotten here, so the map holds only bans in force and the ones
    /// nobody asked about since they ended.
    pub fn banned_until(&self, sub: &str, now_ms: u64) -> Option<u64> {
        let until = *self.until.get(sub)?;
        if until > now_ms {
            return Some(until);
        }
        self.until.remove_if(sub, |_, until| *until <= now_ms);
        None
    }

    /// Drops every ban that has ended: the cluster link calls it now and
    /// then, so bans of users who never come back do not pile up.
    pub fn forget_ended(&self, now_ms: u64) {
        self.until.retain(|_, until| *until > now_ms);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_holds_until_it_ends_and_the_longer_one_wins() {
        let bans = Bans::default();
        assert_eq!(bans.banned_until("alice", 0), None);
        bans.ban("alice", 1_000);
        bans.ban("alice", 500);
        assert_eq!(bans.banned_until("alice", 999), Some(1_000));
        assert_eq!(bans.banned_until("bob", 999), None);
        assert_eq!(bans.banned_until("alice", 1_000), None);
        assert!(bans.is_empty(), "an ended ban is forgotten when asked about");
        bans.ban("bob", 10);
        bans.ban("carol", 30);
        bans.forget_ended(20);
        assert_eq!(bans.len(), 1);
    }
}
