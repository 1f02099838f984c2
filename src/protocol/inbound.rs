//! Parsing client frames.
//!
//! A frame is parsed once, borrowing from the received bytes: the `body` of a
//! `send` stays the sender's exact JSON text (a `RawValue`), which is what
//! every recipient gets.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::room::RoomName;

/// `history` returns this many messages when the client gives no `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
/// The largest `limit` a `history` request may ask for.
pub const MAX_HISTORY_LIMIT: usize = 100;

/// One client request, validated.
#[derive(Debug)]
pub struct Request<'a> {
    /// The client's `ref`, echoed in the `ack`, `pong` or `error` it causes.
    pub reference: Option<Cow<'a, str>>,
    pub kind: RequestKind<'a>,
}

#[derive(Debug)]
pub enum RequestKind<'a> {
    /// `presence`: subscribe to the room's presence (PROTOCOL.md section 8).
    Join {
        room: RoomName,
        since: Option<u64>,
        epoch: Option<Cow<'a, str>>,
        presence: bool,
    },
    Leave {
        room: RoomName,
    },
    Send {
        room: RoomName,
        body: &'a RawValue,
    },
    History {
        room: RoomName,
        before: Option<u64>,
        limit: usize,
    },
    Refresh {
        token: Cow<'a, str>,
    },
    Ping,
    /// Who is in the room (PROTOCOL.md section 8).
    Presence {
        room: RoomName,
    },
}

/// A frame that is not a valid request: answered with `bad_request`.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest {
    pub message: String,
    pub reference: Option<String>,
}

/// Every field any request may carry; which ones a request needs is checked after.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<Cow<'a, str>>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    since: Option<u64>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    before: Option<u64>,
    limit: Option<u64>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    presence: Option<bool>,
}

/// Keeps `"body": null` apart from a missing body: null is a valid body.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one text frame into a request.
pub fn parse_request(text: &str) -> Result<Request<'_>, BadRequest> {
    // serde would also read a JSON array positionally into the struct.
    if !text.trim_start().starts_with('{') {
        return Err(bad("frame must be a JSON object", None));
    }
    let fields: Fields =
        serde_json::from_str(text).map_err(|e| bad(&format!("invalid frame: {e}"), reference_of(text)))?;
    let reference = fields.reference.clone();
    let kind = request_kind(fields)
        .map_err(|message| BadRequest { message, reference: reference.as_deref().map(str::to_owned) })?;
    Ok(Request { reference, kind })
}

/// The `ref` of a frame whose other fields did not parse (a `since` of -1,
/// a `room` that is a number), so that its `bad_request` still carries the
/// `ref` the client waits on (PROTOCOL.md section 3). Only on that error path.
fn reference_of(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Reference {
        #[serde(rename = "ref")]
        reference: Option<String>,
    }
    serde_json::from_str::<Reference>(text).ok()?.reference
}

fn request_kind(f: Fields<'_>) -> Result<RequestKind<'_>, String> {
    let kind = f.kind.as_deref().ok_or("missing \"type\"")?;
    Ok(match kind {
        "join" => RequestKind::Join {
            room: room(f.room)?,
            since: f.since,
            epoch: f.epoch,
            presence: f.presence.unwrap_or(false),
        },
        "leave" => RequestKind::Leave { room: room(f.room)? },
        "send" => {
            let room = room(f.room)?;
            let body = f.body.ok_or("send needs a \"body\"")?;
            RequestKind::Send { room, body }
        }
        "history" => RequestKind::History { room: room(f.room)?, before: f.before, limit: limit(f.limit)? },
        "refresh" => RequestKind::Refresh { token: f.token.ok_or("refresh needs a \"token\"")? },
        "ping" => RequestKind::Ping,
        "presence" => RequestKind::Presence { room: room(f.room)? },
        other => return Err(format!("unknown type {other:?}")),
    })
}

fn room(name: Option<Cow<'_, str>>) -> Result<RoomName, String> {
    let name = name.ok_or("missing \"room\"")?;
    RoomName::parse(&name).map_err(|e| e.to_string())
}

/// Checks a history `limit` (1 to 100, default 50); shared with the HTTP API.
pub fn limit(limit: Option<u64>) -> Result<usize, String> {
    match limit {
        None => Ok(DEFAULT_HISTORY_LIMIT),
        Some(n @ 1..=100) => Ok(n as usize),
        Some(_) => Err(format!("limit must be 1 to {MAX_HISTORY_LIMIT}")),
    }
}

fn bad(message: &str, reference: Option<String>) -> BadRequest {
    BadRequest { message: message.to_owned(), reference }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> RequestKind<'_> {
        parse_request(text).unwrap().kind
    }

    fn error(text: &str) -> BadRequest {
        parse_request(text).unwrap_err()
    }

    #[test]
    fn parses_every_request_type() {
        assert!(matches!(kind(r#"{"type":"join","room":"a"}"#), RequestKind::Join { since: None, .. }));
        match kind(r#"{"type":"join","room":"a","since":5,"epoch":"e1"}"#) {
            RequestKind::Join { room, since, epoch, presence } => {
                assert_eq!(room.as_str(), "a");
                assert_eq!(since, Some(5));
                assert_eq!(epoch.as_deref(), Some("e1"));
                assert!(!presence);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            kind(r#"{"type":"join","room":"a","presence":true}"#),
            RequestKind::Join { presence: true, .. }
        ));
        assert!(matches!(kind(r#"{"type":"presence","room":"a"}"#), RequestKind::Presence { .. }));
        assert!(matches!(kind(r#"{"type":"leave","room":"a"}"#), RequestKind::Leave { .. }));
        assert!(matches!(
            kind(r#"{"type":"history","room":"a"}"#),
            RequestKind::History { before: None, limit: 50, .. }
        ));
        assert!(matches!(
            kind(r#"{"type":"history","room":"a","before":9,"limit":100}"#),
            RequestKind::History { before: Some(9), limit: 100, .. }
        ));
        assert!(matches!(kind(r#"{"type":"refresh","token":"t"}"#), RequestKind::Refresh { .. }));
        let ping = parse_request(r#"{"type":"ping","ref":"r1"}"#).unwrap();
        assert!(matches!(ping.kind, RequestKind::Ping));
        assert_eq!(ping.reference.as_deref(), Some("r1"));
    }

    #[test]
    fn send_keeps_the_exact_body_text() {
        match kind(r#"{"type":"send","room":"a","body": { "x" : [1, 2.50] } ,"ref":"k"}"#) {
            RequestKind::Send { body, .. } => assert_eq!(body.get(), r#"{ "x" : [1, 2.50] }"#),
            other => panic!("{other:?}"),
        }
        match kind(r#"{"type":"send","room":"a","body":null}"#) {
            RequestKind::Send { body, .. } => assert_eq!(body.get(), "null"),
            other => panic!("{other:?}"),
        }
        // Valid JSON whatever the receiver's number range: passed on as sent.
        match kind(r#"{"type":"send","room":"a","body":{"n":1e400}}"#) {
            RequestKind::Send { body, .. } => assert_eq!(body.get(), r#"{"n":1e400}"#),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escaped_strings_are_accepted() {
        assert!(
            matches!(kind(r#"{"type":"join","room":"\u0061b"}"#), RequestKind::Join { room, .. } if room.as_str() == "ab")
        );
    }

    #[test]
    fn rejects_what_is_not_a_request() {
        for text in ["[1]", "\"join\"", "42", "null", "{", "", "{\"type\":1}"] {
            assert!(parse_request(text).is_err(), "{text}");
        }
        assert_eq!(error(r#"{"room":"a"}"#).message, "missing \"type\"");
        assert!(error(r#"{"type":"fly","ref":"z"}"#).message.contains("unknown type"));
        assert_eq!(error(r#"{"type":"fly","ref":"z"}"#).reference.as_deref(), Some("z"));
    }

    #[test]
    fn rejects_missing_or_invalid_fields() {
        assert!(error(r#"{"type":"join"}"#).message.contains("room"));
        assert!(error(r#"{"type":"join","room":"a b"}"#).message.contains("room name"));
        assert!(error(r#"{"type":"send","room":"a"}"#).message.contains("body"));
        assert!(error(r#"{"type":"history","room":"a","limit":0}"#).message.contains("limit"));
        assert!(error(r#"{"type":"history","room":"a","limit":101}"#).message.contains("limit"));
        assert!(error(r#"{"type":"refresh"}"#).message.contains("token"));
        assert!(error(r#"{"type":"join","room":"a","since":-1}"#).message.contains("invalid"));
        assert!(error(r#"{"type":"ping","ref":5}"#).message.contains("invalid"));
        assert!(error(r#"{"type":"presence"}"#).message.contains("room"));
        assert!(error(r#"{"type":"presence","room":""}"#).message.contains("room name"));
        assert!(error(r#"{"type":"join","room":"a","presence":"yes"}"#).message.contains("invalid"));
    }

    #[test]
    fn a_field_of_the_wrong_type_keeps_the_ref() {
        // Found by the property tests: serde failed the whole frame and the
        // error lost its `ref`, so a client waiting on it waited forever.
        for text in [
            r#"{"type":"send","room":"a","body":1,"ref":"r7","since":-1}"#,
            r#"{"ref":"r7","type":"join","room":5}"#,
            r#"{"type":"history","room":"a","limit":"ten","ref":"r7"}"#,
            r#"{"type":7,"ref":"r7"}"#,
        ] {
            let bad = error(text);
            assert!(bad.message.contains("invalid"), "{text}: {}", bad.message);
            assert_eq!(bad.reference.as_deref(), Some("r7"), "{text}");
        }
        // A `ref` that is itself of the wrong type, or a frame that is not
        // JSON, has no `ref` to echo.
        assert_eq!(error(r#"{"type":"ping","ref":5}"#).reference, None);
        assert_eq!(error(r#"{"type":"ping","ref":"r7""#).reference, None);
    }
}
