//! Encoding server frames: each one straight into a complete WebSocket frame.
//!
//! A `message` is encoded once per publish and its bytes are shared by every
//! recipient and by history; the smaller replies are encoded for the one
//! connection that asked. Room names never need JSON escaping (their alphabet
//! has no quote or backslash); every other string goes through serde_json's
//! escaper.

use bytes::Bytes;

use crate::room::RoomName;
use crate::ws::TextFrameBuilder;

/// The `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    NotJoined,
    TooLarge,
    RateLimited,
    Unavailable,
    TooManyRooms,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A JSON object being written into a frame, field by field.
struct Object {
    frame: TextFrameBuilder,
}

impl Object {
    fn new(kind: &str, payload_hint: usize) -> Self {
        let mut frame = TextFrameBuilder::with_capacity(payload_hint + 32);
        let buf = frame.buf();
        buf.extend_from_slice(b"{\"type\":\"");
        buf.extend_from_slice(kind.as_bytes());
        buf.push(b'"');
        Self { frame }
    }

    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        let buf = self.frame.buf();
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(b"\":");
        buf
    }

    fn room(mut self, room: &RoomName) -> Self {
        let buf = self.key("room");
        buf.push(b'"');
        buf.extend_from_slice(room.as_str().as_bytes());
        buf.push(b'"');
        self
    }

    fn string(mut self, key: &str, value: &str) -> Self {
        write_json_string(self.key(key), value);
        self
    }

    fn opt_string(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.string(key, v),
            None => self,
        }
    }

    fn number(mut self, key: &str, value: u64) -> Self {
        let mut digits = itoa::Buffer::new();
        self.key(key).extend_from_slice(digits.format(value).as_bytes());
        self
    }

    fn bool(mut self, key: &str, value: bool) -> Self {
        self.key(key).extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    fn raw(mut self, key: &str, json: &[u8]) -> Self {
        self.key(key).extend_from_slice(json);
        self
    }

    fn finish(mut self) -> Bytes {
        self.frame.buf().push(b'}');
        self.frame.finish()
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_string(buf: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(buf, s);
}

/// A published message, as every member and history receive it.
pub fn message(room: &RoomName, seq: u64, from: &str, ts_millis: u64, body: &[u8]) -> Bytes {
    Object::new("message", room.as_str().len() + from.len() + body.len() + 64)
        .room(room)
        .number("seq", seq)
        .string("from", from)
        .number("ts", ts_millis)
        .raw("body", body)
        .finish()
}

pub fn joined(room: &RoomName, seq: u64, epoch: &str, recovered: Option<bool>) -> Bytes {
    let frame = Object::new("joined", 64).room(room).number("seq", seq).string("epoch", epoch);
    match recovered {
        Some(r) => frame.bool("recovered", r),
        None => frame,
    }
    .finish()
}

pub fn left(room: &RoomName) -> Bytes {
    Object::new("left", 32).room(room).finish()
}

pub fn ack(reference: &str, room: &RoomName, seq: u64) -> Bytes {
    Object::new("ack", 64).string("ref", reference).room(room).number("seq", seq).finish()
}

/// A `history` reply from the JSON texts of stored messages, oldest first.
pub fn history<'m>(room: &RoomName, messages: impl Iterator<Item = &'m [u8]> + Clone) -> Bytes {
    let size: usize = messages.clone().map(|m| m.len() + 1).sum();
    let mut frame = Object::new("history", size + 32).room(room);
    let buf = frame.key("messages");
    write_json_array(buf, messages);
    frame.finish()
}

/// Appends `[a,b,...]` from JSON texts; shared with the HTTP history route.
pub fn write_json_array<'m>(buf: &mut Vec<u8>, items: impl Iterator<Item = &'m [u8]>) {
    buf.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(item);
    }
    buf.push(b']');
}

pub fn refreshed(exp: u64) -> Bytes {
    Object::new("refreshed", 32).number("exp", exp).finish()
}

pub fn pong(reference: Option<&str>) -> Bytes {
    Object::new("pong", 32).opt_string("ref", reference).finish()
}

pub fn error(code: ErrorCode, message: &str, reference: Option<&str>) -> Bytes {
    Object::new("error", message.len() + 48)
        .string("code", code.as_str())
        .string("message", message)
        .opt_string("ref", reference)
        .finish()
}

/// One present user as `presence` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentUser<'a> {
    pub sub: &'a str,
    pub conns: u32,
}

/// Who is in a room, as `presence`, `presence_state` and the HTTP route
/// show it: the exact `count` and at most the first 1,000 users by `sub`.
#[derive(Debug, Clone, Copy)]
pub struct PresenceView<I> {
    pub count: usize,
    pub members: I,
    pub truncated: bool,
}

impl<'a, I: Iterator<Item = PresentUser<'a>>> PresenceView<I> {
    pub fn new(count: usize, members: I, truncated: bool) -> Self {
        Self { count, members, truncated }
    }

    /// Writes `,"count":..,"members":[..],"truncated":..` (after `room`).
    fn write_fields(self, buf: &mut Vec<u8>) {
        let mut digits = itoa::Buffer::new();
        buf.extend_from_slice(b",\"count\":");
        buf.extend_from_slice(digits.format(self.count).as_bytes());
        buf.extend_from_slice(b",\"members\":[");
        for (i, user) in self.members.enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(b"{\"sub\":");
            write_json_string(buf, user.sub);
            buf.extend_from_slice(b",\"conns\":");
            buf.extend_from_slice(digits.format(user.conns).as_bytes());
            buf.push(b'}');
        }
        buf.extend_from_slice(b"],\"truncated\":");
        buf.extend_from_slice(if self.truncated { b"true" } else { b"false" });
    }
}

/// The answer to a `presence` request.
pub fn presence<'a>(
    room: &RoomName,
    view: PresenceView<impl Iterator<Item = PresentUser<'a>>>,
    reference: Option<&str>,
) -> Bytes {
    let mut frame = Object::new("presence", 64 + view.count.min(1000) * 32).room(room);
    view.write_fields(frame.frame.buf());
    frame.opt_string("ref", reference).finish()
}

/// The state a presence subscriber starts from (and gets again after a
/// change too large for a diff).
pub fn presence_state<'a>(room: &RoomName, view: PresenceView<impl Iterator<Item = PresentUser<'a>>>) -> Bytes {
    let mut frame = Object::new("presence_state", 64 + view.count.min(1000) * 32).room(room);
    view.write_fields(frame.frame.buf());
    frame.finish()
}

/// The HTTP route's body: the `presence` answer without `type` and `ref`.
pub fn presence_json<'a>(room: &RoomName, view: PresenceView<impl Iterator<Item = PresentUser<'a>>>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + view.count.min(1000) * 32);
    buf.extend_from_slice(b"{\"room\":\"");
    buf.extend_from_slice(room.as_str().as_bytes());
    buf.push(b'"');
    view.write_fields(&mut buf);
    buf.push(b'}');
    buf
}

/// The net change of a room's users since the subscriber's last state or diff.
pub fn presence_diff<'a>(
    room: &RoomName,
    joins: impl ExactSizeIterator<Item = &'a str>,
    leaves: impl ExactSizeIterator<Item = &'a str>,
    count: usize,
) -> Bytes {
    let mut frame = Object::new("presence_diff", 64 + (joins.len() + leaves.len()) * 24).room(room);
    write_json_strings(frame.key("joins"), joins);
    write_json_strings(frame.key("leaves"), leaves);
    frame.number("count", count as u64).finish()
}

fn write_json_strings<'a>(buf: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    buf.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_json_string(buf, item);
    }
    buf.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::payload;
    use serde_json::{json, Value};

    fn parsed(frame: &Bytes) -> Value {
        assert_eq!(frame[0], 0x81, "a final text frame");
        serde_json::from_slice(payload(frame)).unwrap()
    }

    fn room() -> RoomName {
        RoomName::parse("lobby").unwrap()
    }

    #[test]
    fn message_frame_holds_every_field_and_the_exact_body() {
        let f = message(&room(), 7, "al\"ice", 1_700_000_000_000, br#"{"t": "hi" }"#);
        assert_eq!(
            parsed(&f),
            json!({"type":"message","room":"lobby","seq":7,"from":"al\"ice","ts":1_700_000_000_000u64,"body":{"t":"hi"}})
        );
        assert!(std::str::from_utf8(payload(&f)).unwrap().ends_with(r#""body":{"t": "hi" }}"#));
    }

    #[test]
    fn replies() {
        assert_eq!(
            parsed(&joined(&room(), 3, "ep", Some(true))),
            json!({"type":"joined","room":"lobby","seq":3,"epoch":"ep","recovered":true})
        );
        assert_eq!(
            parsed(&joined(&room(), 0, "ep", None)),
            json!({"type":"joined","room":"lobby","seq":0,"epoch":"ep"})
        );
        assert_eq!(parsed(&left(&room())), json!({"type":"left","room":"lobby"}));
        assert_eq!(parsed(&ack("r", &room(), 9)), json!({"type":"ack","ref":"r","room":"lobby","seq":9}));
        assert_eq!(parsed(&refreshed(99)), json!({"type":"refreshed","exp":99}));
        assert_eq!(parsed(&pong(None)), json!({"type":"pong"}));
        assert_eq!(parsed(&pong(Some("p"))), json!({"type":"pong","ref":"p"}));
        assert_eq!(
            parsed(&error(ErrorCode::NotJoined, "not in \"x\"", Some("q"))),
            json!({"type":"error","code":"not_joined","message":"not in \"x\"","ref":"q"})
        );
    }

    #[test]
    fn history_concatenates_stored_messages() {
        let a = message(&room(), 1, "a", 1, b"1");
        let b = message(&room(), 2, "b", 2, b"2");
        let f = history(&room(), [payload(&a), payload(&b)].into_iter());
        let v = parsed(&f);
        assert_eq!(v["messages"][0]["seq"], 1);
        assert_eq!(v["messages"][1]["body"], 2);
        assert_eq!(
            parsed(&history(&room(), std::iter::empty())),
            json!({"type":"history","room":"lobby","messages":[]})
        );
    }

    #[test]
    fn presence_frames() {
        let users = [PresentUser { sub: "a\"l", conns: 2 }, PresentUser { sub: "bob", conns: 1 }];
        let view = || PresenceView::new(3, users.iter().copied(), true);
        let members = json!([{"sub":"a\"l","conns":2},{"sub":"bob","conns":1}]);
        assert_eq!(
            parsed(&presence(&room(), view(), Some("r"))),
            json!({"type":"presence","room":"lobby","count":3,"members":members,"truncated":true,"ref":"r"})
        );
        assert_eq!(
            parsed(&presence_state(&room(), view())),
            json!({"type":"presence_state","room":"lobby","count":3,"members":members,"truncated":true})
        );
        let http: Value = serde_json::from_slice(&presence_json(&room(), view())).unwrap();
        assert_eq!(http, json!({"room":"lobby","count":3,"members":members,"truncated":true}));
        let empty = PresenceView::new(0, std::iter::empty(), false);
        assert_eq!(
            parsed(&presence(&room(), empty, None)),
            json!({"type":"presence","room":"lobby","count":0,"members":[],"truncated":false})
        );
        assert_eq!(
            parsed(&presence_diff(&room(), ["a", "b"].into_iter(), ["c"].into_iter(), 4)),
            json!({"type":"presence_diff","room":"lobby","joins":["a","b"],"leaves":["c"],"count":4})
        );
    }
}
