//! Property tests of the request parser: any text never panics, and a JSON
//! object with any mix of fields (valid, missing, null, of the wrong type,
//! escaped, in any order) gets the answer PROTOCOL.md section 3 gives it:
//! the request a plain model of the table expects, or `bad_request` with
//! the frame's `ref` when it had one.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::Value;

/// The request types of PROTOCOL.md section 3.
const TYPES: [&str; 7] = ["join", "leave", "send", "history", "refresh", "ping", "presence"];

/// What a frame should parse to, compared field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Bad,
    Join { room: String, since: Option<u64>, epoch: Option<String>, presence: bool },
    Leave { room: String },
    Send { room: String, body: String },
    History { room: String, before: Option<u64>, limit: usize },
    Refresh { token: String },
    Ping,
    Presence { room: String },
}

/// What the parser did, in the model's terms, with the `ref` it kept.
fn observe(result: Result<Request<'_>, BadRequest>) -> (Expect, Option<String>) {
    let request = match result {
        Ok(request) => request,
        Err(bad) => return (Expect::Bad, bad.reference),
    };
    let room = |r: &RoomName| r.as_str().to_owned();
    let expect = match &request.kind {
        RequestKind::Join { room: r, since, epoch, presence } => Expect::Join {
            room: room(r),
            since: *since,
            epoch: epoch.as_deref().map(str::to_owned),
            presence: *presence,
        },
        RequestKind::Leave { room: r } => Expect::Leave { room: room(r) },
        RequestKind::Send { room: r, body } => Expect::Send { room: room(r), body: body.get().to_owned() },
        RequestKind::History { room: r, before, limit } => {
            Expect::History { room: room(r), before: *before, limit: *limit }
        }
        RequestKind::Refresh { token } => Expect::Refresh { token: token.to_string() },
        RequestKind::Ping => Expect::Ping,
        RequestKind::Presence { room: r } => Expect::Presence { room: room(r) },
    };
    (expect, request.reference.as_deref().map(str::to_owned))
}

/// A room name as PROTOCOL.md section 2 defines it.
fn is_room_name(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b))
}

/// One field's reading: absent or null, the value, or the wrong JSON type.
enum Read<T> {
    Missing,
    Value(T),
    WrongType,
}

impl<T> Read<T> {
    fn wrong(&self) -> bool {
        matches!(self, Read::WrongType)
    }
}

fn read<T>(field: &Option<Value>, get: impl Fn(&Value) -> Option<T>) -> Read<T> {
    match field {
        None | Some(Value::Null) => Read::Missing,
        Some(v) => get(v).map_or(Read::WrongType, Read::Value),
    }
}

fn string(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// The fields a frame may carry, each absent or any JSON value.
#[derive(Debug, Clone)]
struct Frame {
    kind: Option<Value>,
    reference: Option<Value>,
    room: Option<Value>,
    since: Option<Value>,
    epoch: Option<Value>,
    body: Option<Value>,
    before: Option<Value>,
    limit: Option<Value>,
    token: Option<Value>,
    presence: Option<Value>,
    /// A field no request has, which is ignored.
    extra: Option<Value>,
}

/// The model: PROTOCOL.md section 3's table, read plainly.
fn expect(f: &Frame) -> (Expect, Option<String>) {
    let reference = match read(&f.reference, string) {
        Read::Missing => None,
        Read::Value(r) => Some(r),
        // A `ref` that is not a string is no `ref`: the frame is bad.
        Read::WrongType => return (Expect::Bad, None),
    };
    let bad = (Expect::Bad, reference.clone());
    let kind = read(&f.kind, string);
    let room = read(&f.room, string);
    let since = read(&f.since, Value::as_u64);
    let epoch = read(&f.epoch, string);
    let before = read(&f.before, Value::as_u64);
    let limit = read(&f.limit, Value::as_u64);
    let token = read(&f.token, string);
    let presence = read(&f.presence, Value::as_bool);
    // A field of the wrong type makes the frame bad, whatever its type.
    let wrong = kind.wrong()
        || room.wrong()
        || since.wrong()
        || epoch.wrong()
        || before.wrong()
        || limit.wrong()
        || token.wrong()
        || presence.wrong();
    if wrong {
        return bad;
    }
    let Read::Value(kind) = kind else { return bad };
    let opt = |r: Read<u64>| match r {
        Read::Value(v) => Some(v),
        _ => None,
    };
    let room = match room {
        Read::Value(r) if is_room_name(&r) => Some(r),
        _ => None,
    };
    let needs_room = |make: &dyn Fn(String) -> Expect| match &room {
        Some(r) => (make(r.clone()), reference.clone()),
        None => bad.clone(),
    };
    match kind.as_str() {
        "join" => {
            let epoch = match epoch {
                Read::Value(e) => Some(e),
                _ => None,
            };
            let presence = matches!(presence, Read::Value(true));
            let since = opt(since);
            needs_room(&|room| Expect::Join { room, since, epoch: epoch.clone(), presence })
        }
        "leave" => needs_room(&|room| Expect::Leave { room }),
        "send" => match &f.body {
            Some(body) => needs_room(&|room| Expect::Send { room, body: encode(body, false) }),
            None => bad,
        },
        "history" => match opt(limit) {
            None => needs_room(&|room| Expect::History { room, before: opt_ref(&before), limit: 50 }),
            Some(l @ 1..=100) => {
                needs_room(&|room| Expect::History { room, before: opt_ref(&before), limit: l as usize })
            }
            Some(_) => bad,
        },
        "refresh" => match token {
            Read::Value(token) => (Expect::Refresh { token }, reference),
            _ => bad,
        },
        "ping" => (Expect::Ping, reference),
        "presence" => needs_room(&|room| Expect::Presence { room }),
        _ => bad,
    }
}

fn opt_ref(r: &Read<u64>) -> Option<u64> {
    match r {
        Read::Value(v) => Some(*v),
        _ => None,
    }
}

/// JSON text for `v`; with `escape`, every character of every string as a
/// `\u` escape (the parser must then unescape: no borrowing).
fn encode(v: &Value, escape: bool) -> String {
    match v {
        Value::String(s) if escape => {
            let mut out = String::from("\"");
            for unit in s.encode_utf16() {
                out.push_str(&format!("\\u{unit:04x}"));
            }
            out.push('"');
            out
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(|i| encode(i, escape)).collect();
            format!("[{}]", items.join(","))
        }
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}:{}", encode(&Value::String(k.clone()), escape), encode(v, escape)))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        other => other.to_string(),
    }
}

/// The frame's text: its fields in the given order, with the given
/// whitespace between tokens.
fn frame_text(f: &Frame, order: &[usize], space: &str, escape: bool) -> String {
    let fields = [
        ("type", &f.kind),
        ("ref", &f.reference),
        ("room", &f.room),
        ("since", &f.since),
        ("epoch", &f.epoch),
        ("body", &f.body),
        ("before", &f.before),
        ("limit", &f.limit),
        ("token", &f.token),
        ("presence", &f.presence),
        ("unknown_field", &f.extra),
    ];
    let mut parts = Vec::new();
    for &i in order {
        if let (name, Some(value)) = fields[i % fields.len()] {
            // The body is kept as sent: escaping it changes the expected text.
            let value = if name == "body" { encode(value, false) } else { encode(value, escape) };
            parts.push(format!("{space}\"{name}\"{space}:{space}{value}{space}"));
        }
    }
    format!("{space}{{{}}}{space}", parts.join(","))
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-z\"\\\\é]{0,6}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Absent, or mostly the right type, sometimes anything.
fn field(right: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.6, prop_oneof![4 => right.boxed(), 1 => json_leaf().boxed()])
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..200).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-5i64..0).prop_map(Value::from),
        (0.0f64..10.0).prop_map(Value::from),
    ]
}

fn room_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => "[A-Za-z0-9_.:@-]{1,12}",
        1 => "[a-z]{120,135}",
        1 => Just(String::new()),
        2 => "[a-z]{0,4}[ /#é\\PC][a-z]{0,4}",
    ]
    .prop_map(Value::String)
}

fn frame() -> impl Strategy<Value = Frame> {
    let kind = prop_oneof![
        8 => prop::sample::select(TYPES.to_vec()).prop_map(|t| Value::String(t.to_owned())),
        1 => "[a-z]{0,8}".prop_map(Value::String),
    ];
    (
        (field(kind), field("\\PC{0,10}".prop_map(Value::String)), field(room_name()), field(number())),
        (field("[a-z0-9]{1,8}".prop_map(Value::String)), prop::option::weighted(0.7, json_value()), field(number())),
        (field(number()), field("\\PC{1,20}".prop_map(Value::String)), field(any::<bool>().prop_map(Value::Bool))),
        prop::option::of(json_value()),
    )
        .prop_map(|((kind, reference, room, since), (epoch, body, before), (limit, token, presence), extra)| {
            Frame { kind, reference, room, since, epoch, body, before, limit, token, presence, extra }
        })
}

/// Whether `text` is one JSON object by the grammar (RFC 8259). Number
/// ranges are not checked: a body of `1e400` is valid JSON that chorus
/// passes on as sent, as PROTOCOL.md section 3 says (`body` exactly as sent).
fn is_json_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{')
        && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

proptest! {
    /// Any text: no panic, and only a JSON object can be a request.
    #[test]
    fn any_text_never_panics(text in "\\PC{0,200}") {
        if parse_request(&text).is_ok() {
            prop_assert!(is_json_object(&text), "{}", text);
        }
    }

    /// Any mix of fields, in any order, escaped or not: the model's answer,
    /// `ref` included.
    #[test]
    fn frames_parse_as_the_protocol_table_says(
        f in frame(),
        order in Just((0..11).collect::<Vec<usize>>()).prop_shuffle(),
        space in prop::sample::select(vec!["", " ", "\n\t", "\r\n "]),
        escape in any::<bool>(),
    ) {
        let text = frame_text(&f, &order, space, escape);
        prop_assert_eq!(observe(parse_request(&text)), expect(&f), "{}", text);
    }

    /// A valid request with one character changed, added or removed: no
    /// panic, and whatever parses is a JSON object.
    #[test]
    fn damaged_requests_never_panic(
        f in frame(),
        at in any::<usize>(),
        edit in 0u8..3,
        c in any::<char>(),
    ) {
        let mut text: Vec<char> = frame_text(&f, &(0..11).collect::<Vec<_>>(), "", false).chars().collect();
        let at = at % (text.len() + 1);
        match edit {
            0 if at < text.len() => text[at] = c,
            1 => text.insert(at, c),
            _ if at < text.len() => {
                text.remove(at);
            }
            _ => {}
        }
        let text: String = text.into_iter().collect();
        if parse_request(&text).is_ok() {
            prop_assert!(is_json_object(&text), "{}", text);
        }
    }
}
