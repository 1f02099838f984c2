//! The chorus wire protocol (PROTOCOL.md section 3): client frames in,
//! server frames out.

pub mod inbound;
pub mod outbound;

pub use inbound::{parse_request, BadRequest, Request, RequestKind, DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
pub use outbound::ErrorCode;
