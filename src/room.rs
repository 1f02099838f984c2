//! Room names and the room patterns of a token's `rooms` claim.
//!
//! A room name is validated once, where it enters the server, and then carried
//! as a cheap `Arc<str>` clone: the registry, the bus and every frame builder
//! can trust it (it never needs JSON escaping, by construction).

use std::fmt;
use std::sync::Arc;

/// The longest room name the protocol allows, in bytes.
pub const MAX_ROOM_NAME_BYTES: usize = 128;

/// A validated room name: 1 to 128 bytes of `A-Z a-z 0-9 _ - . : @`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

/// Why a string is not a room name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoomNameError {
    #[error("room name must be 1 to 128 bytes")]
    Length,
    #[error("room name may only contain A-Z a-z 0-9 _ - . : @")]
    Character,
}

fn is_room_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@')
}

impl RoomName {
    pub fn parse(name: &str) -> Result<Self, RoomNameError> {
        if name.is_empty() || name.len() > MAX_ROOM_NAME_BYTES {
            return Err(RoomNameError::Length);
        }
        if !name.bytes().all(is_room_byte) {
            return Err(RoomNameError::Character);
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl std::borrow::Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// One entry of the `rooms` claim: an exact name, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RoomPattern {
    Exact(Box<str>),
    Prefix(Box<str>),
}

/// Which rooms a token allows. `None` (no `rooms` claim) allows every room.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoomPatterns(Option<Box<[RoomPattern]>>);

/// Why a `rooms` claim entry is not a pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid room pattern {0:?}")]
pub struct RoomPatternError(pub String);

impl RoomPatterns {
    /// Every room.
    pub fn any() -> Self {
        Self(None)
    }

    /// Parses the entries of a `rooms` claim. A `*` may only end a pattern;
    /// the prefix before it follows the room-name alphabet and may be empty
    /// (`"*"` allows every room).
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, RoomPatternError> {
        let parsed = patterns.iter().map(|p| parse_pattern(p.as_ref())).collect::<Result<Vec<_>, _>>()?;
        Ok(Self(Some(parsed.into_boxed_slice())))
    }

    pub fn allows(&self, room: &RoomName) -> bool {
        let Some(patterns) = &self.0 else {
            return true;
        };
        let room = room.as_str();
        patterns.iter().any(|p| match p {
            RoomPattern::Exact(name) => **name == *room,
            RoomPattern::Prefix(prefix) => room.starts_with(&**prefix),
        })
    }
}

fn parse_pattern(pattern: &str) -> Result<RoomPattern, RoomPatternError> {
    let invalid = || RoomPatternError(pattern.to_owned());
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            if prefix.len() >= MAX_ROOM_NAME_BYTES || !prefix.bytes().all(is_room_byte) {
                return Err(invalid());
            }
            Ok(RoomPattern::Prefix(prefix.into()))
        }
        None => RoomName::parse(pattern).map(|_| RoomPattern::Exact(pattern.into())).map_err(|_| invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    #[test]
    fn room_names_follow_the_alphabet_and_length() {
        assert!(RoomName::parse("lobby").is_ok());
        assert!(RoomName::parse("a.b:c@d_e-F9").is_ok());
        assert_eq!(RoomName::parse(""), Err(RoomNameError::Length));
        assert!(RoomName::parse(&"x".repeat(128)).is_ok());
        assert_eq!(RoomName::parse(&"x".repeat(129)), Err(RoomNameError::Length));
        for bad in ["a b", "a/b", "é", "a\"b", "a*", "a\\b"] {
            assert_eq!(RoomName::parse(bad), Err(RoomNameError::Character), "{bad}");
        }
    }

    #[test]
    fn absent_claim_allows_every_room() {
        assert!(RoomPatterns::any().allows(&room("anything")));
    }

    #[test]
    fn exact_and_prefix_patterns() {
        let p = RoomPatterns::parse(&["lobby", "team-*"]).unwrap();
        assert!(p.allows(&room("lobby")));
        assert!(!p.allows(&room("lobby2")));
        assert!(p.allows(&room("team-a")));
        assert!(p.allows(&room("team-")));
        assert!(!p.allows(&room("team")));
        assert!(!p.allows(&room("other")));
    }

    #[test]
    fn star_alone_allows_all_and_empty_list_allows_none() {
        assert!(RoomPatterns::parse(&["*"]).unwrap().allows(&room("x")));
        assert!(!RoomPatterns::parse::<&str>(&[]).unwrap().allows(&room("x")));
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for bad in ["", "a*b", "**", "a b*", "x/y"] {
            assert!(RoomPatterns::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
