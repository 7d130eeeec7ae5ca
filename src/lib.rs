//! sluice: a crash-safe HTTP-to-Kafka ingest daemon.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//!  client ──POST──> http ──> ingest ──> wal ══fdatasync══> 202
//!                   │        parse,     segmented log,
//!                   │        normalize  group commit
//!                   auth                    │
//!                   (keys, rates)           ▼
//!                                        replay ──produce──> Kafka
//!                                        │  committed offset (replay::offsets)
//!                                        └─ refused records: dead letters
//! ```
//!
//! - [`http`]: router, the POST path (`http::ingest`), status endpoints
//!   (`http::status`), listener and TLS.
//! - [`auth`]: API keys, tenant scopes and rate limits.
//! - [`ingest`]: body decoding, parsing, normalization into WAL records.
//! - [`wal`]: the write-ahead log (format, writer, reader, recovery).
//! - [`replay`]: WAL to Kafka, the committed offset, dead letters.
//! - [`archive`]: records into hourly NDJSON files and hourly analytics,
//!   exactly once (`sluice archive` from Kafka, the `files` sink from the WAL).
//! - [`datadir`]: the data directory's layout and its lock.
//! - [`metrics`]: Prometheus; observes the stages, none depends on it but
//!   `http`, which serves it.
//! - [`streams`]: named streams (routes, schema, topics), resolved from
//!   `[[streams]]`, `[events]` and `[kafka]`.
//! - [`config`]: composes each stage's own config section.
//! - `server` (wiring and shutdown order) and `cli` (subcommands) sit on
//!   top; [`dev`] holds the development broker and consumer.
//! - Leaves: [`tenant`], [`systemd`], `debug` (test pause hooks),
//!   [`storage`] (every durable write, sync, rename and directory: the
//!   WAL's file I/O and `SimFs`, and whole files made durable).
//!
//! A module uses only modules below it; `tests/architecture.rs` checks the
//! graph has no cycle.

#![forbid(unsafe_code)]
// Tests write their fixtures with plain std::fs; the product goes through
// `storage` (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod archive;
pub mod auth;
#[cfg(feature = "kafka")]
pub mod cli;
pub mod config;
pub mod datadir;
#[doc(hidden)]
pub mod debug;
#[cfg(feature = "kafka")]
pub mod dev;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod idempotency;
pub mod ingest;
pub mod instance;
pub mod metrics;
#[cfg(feature = "kafka")]
pub mod redrive;
pub mod replay;
#[cfg(feature = "kafka")]
pub mod server;
#[cfg(feature = "kafka")]
mod server_idempotency;
pub mod storage;
pub mod streams;
pub mod systemd;
pub mod tenant;
pub mod wal;
