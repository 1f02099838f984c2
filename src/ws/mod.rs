//! The WebSocket framing chorus speaks after the upgrade (RFC 6455).
//!
//! fastwebsockets performs the handshake; framing lives here because the two
//! hot paths want shapes that a general-purpose WebSocket type does not give:
//! server frames are built once as complete `Bytes` and shared by every
//! recipient, and the reader holds no buffer at all while a connection is idle
//! (fastwebsockets keeps 8 KiB per connection), caps the size of a whole
//! message rather than of each fragment, and answers an oversized message with
//! a 1009 close.

pub mod deflate;
pub mod extension;
pub mod frame;
pub mod linger;
pub mod reader;

/// Frame opcodes (RFC 6455 section 5.2).
mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

pub use deflate::{deflate_frame, PeerDeflate};
pub use frame::{close_frame, ping_frame, pong_frame, TextFrameBuilder};
pub use reader::{FrameReader, Incoming, ReadError};
