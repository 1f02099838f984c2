//! chorus: a real-time chat and fanout WebSocket server.
//!
//! The binary (`src/main.rs`), the tests and the benches share this library.
//! docs/ARCHITECTURE.md walks through the modules and the path of a message.

pub mod admin;
pub mod auth;
pub mod build_info;
pub mod bus;
pub mod config;
pub mod conn;
pub mod eviction;
pub mod history;
pub mod http;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod registry;
pub mod room;
pub mod server;
pub mod state;
pub mod tls;
pub mod ws;

pub use config::{Config, ServeArgs};
pub use server::Server;
