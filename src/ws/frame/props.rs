//! Property tests of the server's frame encoding: for any payload, the bytes
//! are one RFC 6455 frame (FIN, the right opcode, unmasked, the length in its
//! shortest form) whose payload is what was asked for; control frames stay
//! within 125 bytes and a close reason is cut at a character boundary.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

/// Reads one unmasked frame as a client would: (first byte, payload), and
/// checks the length is in its shortest form and the frame is all of `bytes`.
fn decode(bytes: &[u8]) -> (u8, &[u8]) {
    assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
    let (len, header) = match bytes[1] & 0x7F {
        126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
        127 => {
            let mut len = [0; 8];
            len.copy_from_slice(&bytes[2..10]);
            (u64::from_be_bytes(len) as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    let shortest = match len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    assert_eq!(header, shortest, "length {len} in its shortest form");
    assert_eq!(bytes.len(), header + len, "one whole frame");
    (bytes[0], &bytes[header..])
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..300, 65_530usize..65_540, Just(70_000)]
}

proptest! {
    #[test]
    fn text_frames_carry_their_payload(len in length(), byte in any::<u8>()) {
        let data = vec![byte; len];
        for frame in [text_frame(&data), {
            let mut b = TextFrameBuilder::with_capacity(0);
            b.buf().extend_from_slice(&data);
            b.finish()
        }] {
            let (first, body) = decode(&frame);
            prop_assert_eq!(first, 0x81);
            prop_assert_eq!(body, &data[..]);
            prop_assert_eq!(payload(&frame), &data[..]);
        }
    }

    #[test]
    fn close_frames_keep_the_code_and_a_whole_utf8_reason(code in any::<u16>(), reason in "\\PC{0,80}") {
        let frame = close_frame(code, &reason);
        let (first, body) = decode(&frame);
        prop_assert_eq!(first, 0x88);
        prop_assert!(body.len() <= 125);
        prop_assert_eq!(u16::from_be_bytes([body[0], body[1]]), code);
        let sent = std::str::from_utf8(&body[2..]).expect("the reason stays UTF-8");
        prop_assert!(reason.starts_with(sent));
        // Cut only as far as needed: the next character would not have fit.
        if sent.len() < reason.len() {
            let next = reason[sent.len()..].chars().next().map_or(0, char::len_utf8);
            prop_assert!(sent.len() + next > 123);
        }
    }

    #[test]
    fn pongs_echo_at_most_125_bytes(data in vec(any::<u8>(), 0..300)) {
        let frame = pong_frame(&data);
        let (first, body) = decode(&frame);
        prop_assert_eq!(first, 0x8A);
        prop_assert_eq!(body, &data[..data.len().min(125)]);
    }
}
