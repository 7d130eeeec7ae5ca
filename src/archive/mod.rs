//! The archive: records into hourly NDJSON files with hourly analytics,
//! exactly once, for `sluice archive` (from Kafka) and the `files` sink
//! (from the WAL). The writer knows nothing about its source; the source
//! hands it an opaque `progress` value with each commit and gets it back on
//! open.
//!
//! ```text
//! DIR/checkpoint                          committed lengths, progress, open hours' generations
//! DIR/checkpoint.d/2026-11-26T12.17.json  an open hour's analytics (written when it changed)
//! DIR/logs/2026-11-26/12.log.json         one event per line, by event time (UTC)
//! DIR/logs/unparsed/2026-11-26/12.json    {"position","reason","value"} by arrival
//! DIR/analytics/2026-11-26/summary_12.json
//! ```
//!
//! Using it from a source:
//!
//! ```no_run
//! # use sluice::archive::{Writer, WriterOptions};
//! let (mut w, progress) = Writer::open(WriterOptions::new("/var/lib/archive"))?;
//! // Resume the source after `progress` (Value::Null on a fresh directory).
//! # let records: Vec<(Vec<u8>, u64)> = vec![];
//! for (value, seq) in records {
//!     w.append(&value, &serde_json::json!({ "seq": seq }))?;
//! }
//! // Durable together: the lines, the analytics and the position.
//! w.commit(&serde_json::json!({ "seq": 42 }))?;
//! // Only now may the source acknowledge (commit a Kafka offset, advance
//! // the WAL's committed offset).
//! # Ok::<(), sluice::archive::ArchiveError>(())
//! ```
//!
//! Rules:
//! - `append` buffers; files stay open (at most `max_open_files`, the least
//!   recently written is fdatasynced and closed to make room). Nothing is
//!   committed until `commit`.
//! - `commit(progress)`: write buffers → fdatasync dirty files and new
//!   directory entries → checkpoint: the changed hours' files (tmp, fsync,
//!   rename, one directory fsync), then the main file (tmp, fsync, rename,
//!   directory fsync), then unlink the hour files it no longer names →
//!   seal idle hours (summary fsynced, then the checkpoint again without
//!   them) → refresh open hours' summaries. See [`checkpoint`].
//! - `open`: truncates every file to its committed length and removes the
//!   layout's files the checkpoint does not know (created after it: nothing
//!   in them was committed); other files in the directory are left alone.
//!   A sealed hour's committed length is in its summary (`bytes`).
//!   A corrupt checkpoint, or archive files without one, is an error
//!   ([`CheckpointError::Corrupt`]): starting would duplicate or lose lines.
//!   A missing or damaged hour file is not: its counts are rebuilt from
//!   the hour's file (lengths and progress are in the main file).
//! - After any `Err` from `append` or `commit`, drop the writer and open it
//!   again; it refuses further use.
//! - A late event reopens its hour: counts continue from the summary.

pub mod analytics;
pub mod checkpoint;
pub mod config;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod layout;
pub mod writer;

pub use analytics::{AnalyticsSpec, HourStats, Summary};
pub use checkpoint::CheckpointError;
pub use config::ArchiveConfig;
pub use layout::{Hour, Layout};
pub use writer::{AnalyticsView, ArchiveError, Placed, Writer, WriterMetrics, WriterOptions};

/// Debug builds: sleeps at a named ordering point so that the chaos test's
/// SIGKILLs land inside the window more often.
/// `SLUICE_DEBUG_ARCHIVE_PAUSE="checkpoint=30,kafka=30"`: `checkpoint` is
/// after the files' fdatasync and the changed hours' checkpoint files, and
/// before the main checkpoint's rename; `kafka` after the checkpoint and
/// before the Kafka offset commit.
pub(crate) fn debug_pause(site: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    let Ok(spec) = std::env::var("SLUICE_DEBUG_ARCHIVE_PAUSE") else {
        return;
    };
    let ms = spec
        .split(',')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim() == site)
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
