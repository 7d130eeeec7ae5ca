pub mod auth;
#[cfg(feature = "kafka")]
pub mod cli;
pub mod config;
#[doc(hidden)]
pub mod debug;
#[cfg(feature = "kafka")]
pub mod dev;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod replay;
#[cfg(feature = "kafka")]
pub mod server;
pub mod systemd;
pub mod tenant;
pub mod wal;
