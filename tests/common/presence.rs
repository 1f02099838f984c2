//! Presence helpers shared by the single-node and cluster presence tests:
//! joining with `"presence": true`, asking `presence`, and a subscriber's
//! view kept from the frames it receives.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{unique_ref, Client};

/// Longer than the diff interval (100 ms), so a due diff has been queued.
pub const SETTLE: Duration = Duration::from_millis(400);

pub async fn join_presence(client: &mut Client, room: &str) -> Value {
    client.send_json(&json!({"type": "join", "room": room, "presence": true})).await;
    let joined = client.recv_type("joined").await;
    assert_eq!(joined["room"], room);
    let state = client.recv_type("presence_state").await;
    assert_eq!(state["room"], room);
    state
}

pub async fn ask_presence(client: &mut Client, room: &str) -> Value {
    let reference = unique_ref("p");
    client.send_json(&json!({"type": "presence", "room": room, "ref": reference})).await;
    let answer = client.recv_type("presence").await;
    assert_eq!(answer["ref"], reference);
    assert_eq!(answer["room"], room);
    answer
}

pub fn subs(view: &Value) -> Vec<String> {
    view["members"].as_array().unwrap().iter().map(|m| m["sub"].as_str().unwrap().to_owned()).collect()
}

pub fn strings(value: &Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

/// A subscriber's view of the room, kept up to date from its frames.
pub struct Tracked {
    pub members: BTreeSet<String>,
    pub count: u64,
}

impl Tracked {
    pub fn from_state(state: &Value) -> Self {
        Self { members: subs(state).into_iter().collect(), count: state["count"].as_u64().unwrap() }
    }

    /// Applies a `presence_diff` or `presence_state`.
    pub fn apply(&mut self, frame: &Value) {
        match frame["type"].as_str() {
            Some("presence_state") => *self = Self::from_state(frame),
            Some("presence_diff") => {
                let joins = strings(&frame["joins"]);
                let leaves = strings(&frame["leaves"]);
                for sub in &joins {
                    assert!(!leaves.contains(sub), "{sub} both came and went in {frame}");
                }
                self.members.extend(joins);
                for sub in leaves {
                    self.members.remove(&sub);
                }
                self.count = frame["count"].as_u64().unwrap();
            }
            _ => panic!("not a presence frame: {frame}"),
        }
    }

    /// Applies every frame up to the answer of a `presence` request, and
    /// checks the view against that answer.
    pub async fn sync_and_check(&mut self, client: &mut Client, room: &str) {
        let (frames, answer) = read_until_presence(client, room).await;
        for frame in &frames {
            self.apply(frame);
        }
        assert_eq!(self.count, answer["count"].as_u64().unwrap(), "count after the diffs");
        let fresh: BTreeSet<String> = subs(&answer).into_iter().collect();
        assert_eq!(self.members, fresh, "members after the diffs");
    }
}

/// Waits for due diffs, asks `presence`, and returns the frames that came
/// before the answer, and the answer.
pub async fn read_until_presence(client: &mut Client, room: &str) -> (Vec<Value>, Value) {
    tokio::time::sleep(SETTLE).await;
    let reference = unique_ref("sync");
    client.send_json(&json!({"type": "presence", "room": room, "ref": reference})).await;
    let mut frames = Vec::new();
    loop {
        let frame = client.recv_json().await;
        if frame["type"] == "presence" {
            assert_eq!(frame["ref"], reference);
            return (frames, frame);
        }
        frames.push(frame);
    }
}
