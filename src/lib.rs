pub mod auth;
#[cfg(feature = "kafka")]
pub mod cli;
pub mod config;
#[doc(hidden)]
pub mod debug;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod idempotency;
pub mod ingest;
pub mod instance;
pub mod kafka;
pub mod metrics;
pub mod offsets;
#[cfg(feature = "kafka")]
pub mod server;
#[cfg(feature = "kafka")]
mod server_idempotency;
pub mod systemd;
pub mod wal;
