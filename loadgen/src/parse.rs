//! Reading server frames without building a JSON tree: a one-pass walk over
//! the top-level object that keeps only the fields loadgen needs (type,
//! room, seq, ref, code, message, epoch) and, inside a message `body`, the
//! marker a loadgen publisher put there (scheduled and actual send time,
//! publisher id, counter). Strings are borrowed as they are on the wire
//! (escapes are not decoded: none of the fields we act on can hold one).
//!
//! Deliveries are the bulk of what loadgen reads, so this is the hot path.

/// What a loadgen publisher writes into each message body.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Scheduled send time, Unix ns.
    pub sched_ns: u64,
    /// Actual send time, Unix ns.
    pub sent_ns: u64,
    /// Publisher (connection) id.
    pub publisher: u64,
    /// The publisher's message counter.
    pub k: u64,
}

/// The fields of a server frame that loadgen uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerFrame<'a> {
    pub ty: &'a str,
    pub room: Option<&'a str>,
    pub seq: Option<u64>,
    pub reference: Option<&'a str>,
    pub code: Option<&'a str>,
    pub message: Option<&'a str>,
    pub epoch: Option<&'a str>,
    pub marker: Option<Marker>,
    /// `count` of presence frames.
    pub count: Option<u64>,
    /// `recovered` of a `joined` answering a join with `since`.
    pub recovered: Option<bool>,
}

/// Parse one text frame; None when it is not a JSON object with a `type`.
pub fn parse(buf: &[u8]) -> Option<ServerFrame<'_>> {
    let mut p = Scanner { b: buf, i: 0 };
    let mut f = ServerFrame::default();
    let mut ty = None;
    p.object(|p, key| {
        match key {
            b"type" => ty = Some(p.string()?),
            b"room" => f.room = Some(p.string()?),
            b"seq" => f.seq = p.number(),
            b"count" => f.count = p.number(),
            b"recovered" => f.recovered = p.boolean(),
            b"ref" => f.reference = p.string_or_skip(),
            b"code" => f.code = p.string_or_skip(),
            b"message" => f.message = p.string_or_skip(),
            b"epoch" => f.epoch = p.string_or_skip(),
            b"body" => f.marker = p.marker(),
            _ => p.skip_value()?,
        }
        Some(())
    })?;
    f.ty = ty?;
    Some(f)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline]
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        if self.peek()? == c {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// A string's raw contents (escapes left in place).
    fn string(&mut self) -> Option<&'a str> {
        let s = self.raw_string()?;
        std::str::from_utf8(s).ok()
    }

    /// A string's raw bytes, not checked for UTF-8 (for strings skipped).
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            let rest = self.b.get(self.i..)?;
            self.i += rest.iter().position(|&c| c == b'"' || c == b'\\')?;
            if self.b[self.i] == b'"' {
                break;
            }
            self.i += 2;
        }
        let s = self.b.get(start..self.i)?;
        self.i += 1;
        Some(s)
    }

    /// A string, or None (and skipped) for another kind of value.
    fn string_or_skip(&mut self) -> Option<&'a str> {
        if self.peek()? == b'"' {
            self.string()
        } else {
            self.skip_value();
            None
        }
    }

    /// A non-negative integer; other numbers, and integers past `u64`, are
    /// skipped and give None.
    fn number(&mut self) -> Option<u64> {
        self.ws();
        let rest = self.b.get(self.i..)?;
        // One pass without an overflow check per digit (a delivery carries
        // three 19-digit nanosecond times); only a 20th digit can overflow.
        let (mut value, mut digits) = (0u64, 0usize);
        for &c in rest {
            let digit = c.wrapping_sub(b'0');
            if digit > 9 {
                break;
            }
            value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
            digits += 1;
        }
        let value = if digits < 20 {
            Some(value)
        } else {
            rest[..digits].iter().try_fold(0u64, |v, &c| v.checked_mul(10)?.checked_add(u64::from(c - b'0')))
        };
        self.i += digits;
        match self.b.get(self.i) {
            Some(b'.' | b'e' | b'E' | b'-' | b'+') => {
                self.skip_scalar();
                None
            }
            _ if digits > 0 => value,
            _ => {
                self.skip_value();
                None
            }
        }
    }

    /// `true` or `false`; any other value is skipped and gives None.
    fn boolean(&mut self) -> Option<bool> {
        self.ws();
        let rest = self.b.get(self.i..)?;
        let value = if rest.starts_with(b"true") {
            Some(true)
        } else if rest.starts_with(b"false") {
            Some(false)
        } else {
            None
        };
        self.skip_value();
        value
    }

    fn skip_scalar(&mut self) {
        while let Some(c) = self.b.get(self.i) {
            if matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.i += 1;
        }
    }

    /// Skip any JSON value.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.raw_string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *self.b.get(self.i)? {
                        b'"' => {
                            self.raw_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => self.skip_scalar(),
        }
        Some(())
    }

    /// Walk an object, calling `field` with each (raw) key positioned on its
    /// value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.raw_string()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The loadgen marker of a message body, if it is one; the body is
    /// consumed either way.
    fn marker(&mut self) -> Option<Marker> {
        let start = self.i;
        if self.peek() != Some(b'{') {
            self.skip_value();
            return None;
        }
        let mut m = Marker::default();
        let (mut t, mut k) = (false, false);
        let ok = self.object(|p, key| {
            match key {
                b"t" => {
                    m.sched_ns = p.number()?;
                    t = true;
                }
                b"s" => m.sent_ns = p.number()?,
                b"p" => m.publisher = p.number()?,
                b"k" => {
                    m.k = p.number()?;
                    k = true;
                }
                _ => p.skip_value()?,
            }
            Some(())
        });
        if ok.is_none() {
            // Not our shape: skip the body as a whole.
            self.i = start;
            self.skip_value();
            return None;
        }
        (t && k).then_some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_message() {
        let f = parse(
            br#"{"type":"message","room":"lg-3","seq":5,"from":"lg-3","ts":1700000000000,"body":{"t":123,"s":124,"p":7,"k":9,"pad":"xx\"x"}}"#,
        )
        .unwrap();
        assert_eq!(f.ty, "message");
        assert_eq!(f.room, Some("lg-3"));
        assert_eq!(f.seq, Some(5));
        assert_eq!(f.marker, Some(Marker { sched_ns: 123, sent_ns: 124, publisher: 7, k: 9 }));
    }

    #[test]
    fn any_field_order_and_spaces() {
        let f =
            parse(br#"{ "body" : {"k":1, "pad":"}", "t": 2 }, "seq" : 10, "room":"r", "type" : "message" }"#).unwrap();
        assert_eq!(f.seq, Some(10));
        assert_eq!(f.marker.map(|m| (m.sched_ns, m.k)), Some((2, 1)));
    }

    #[test]
    fn foreign_bodies() {
        let f = parse(br#"{"type":"message","room":"r","seq":1,"body":{"t":"no","x":[1,{"a":2}]}}"#).unwrap();
        assert_eq!(f.seq, Some(1));
        assert_eq!(f.marker, None);
        let f = parse(br#"{"type":"message","body":[1,2,{"}":"{"}],"seq":3}"#).unwrap();
        assert_eq!(f.seq, Some(3));
        let f = parse(br#"{"type":"message","body":"text","seq":4,"room":"q"}"#).unwrap();
        assert_eq!((f.seq, f.room), (Some(4), Some("q")));
    }

    #[test]
    fn numbers_past_u64_or_not_integers_give_none_and_are_skipped() {
        let f = parse(br#"{"type":"message","seq":18446744073709551615,"room":"a"}"#).unwrap();
        assert_eq!((f.seq, f.room), (Some(u64::MAX), Some("a")));
        for seq in ["18446744073709551616", "123456789012345678901234", "1.5", "2e3", "-1", "null"] {
            let frame = format!(r#"{{"type":"message","seq":{seq},"room":"b"}}"#);
            let f = parse(frame.as_bytes()).unwrap();
            assert_eq!((f.seq, f.room), (None, Some("b")), "seq {seq}");
        }
    }

    #[test]
    fn parses_control_frames() {
        let f = parse(br#"{"type":"ack","ref":"123","room":"r1","seq":5}"#).unwrap();
        assert_eq!((f.ty, f.reference, f.seq), ("ack", Some("123"), Some(5)));
        let f = parse(br#"{"type":"error","code":"bad_request","message":"bad \"room\"","ref":null}"#).unwrap();
        assert_eq!(f.code, Some("bad_request"));
        assert_eq!(f.message, Some(r#"bad \"room\""#));
        assert_eq!(f.reference, None);
        let f = parse(br#"{"type":"joined","room":"a","seq":0,"epoch":"e1","recovered":false}"#).unwrap();
        assert_eq!((f.seq, f.epoch, f.recovered), (Some(0), Some("e1"), Some(false)));
        let f = parse(br#"{"type":"joined","recovered": true ,"room":"a","seq":3}"#).unwrap();
        assert_eq!((f.recovered, f.room, f.seq), (Some(true), Some("a"), Some(3)));
        let f = parse(br#"{"type":"joined","recovered":"yes","room":"a"}"#).unwrap();
        assert_eq!((f.recovered, f.room), (None, Some("a")));
        assert!(parse(b"[1]").is_none());
        assert!(parse(br#"{"seq":1}"#).is_none());
        assert!(parse(br#"{"type":"x""#).is_none());
    }
}
