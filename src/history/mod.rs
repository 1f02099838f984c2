//! Durable history in PostgreSQL: the store, its migrations, and the
//! write-behind queue that keeps the database off the publish path.

pub mod migrations;
pub mod store;
pub mod writer;

pub use store::{Database, PersistedMessage};
