//! The data directory's layout, in one place, and its lock. A leaf: the
//! stages ask it for their paths.
//!
//! ```text
//! DATA_DIR/
//!   LOCK                          flock held by the running daemon, holds its pid
//!   wal/<first seq, 20 digits>.wal  WAL segments (see docs/design.md)
//!   offsets/                      the committed offset and lost ranges (sled)
//!   idempotency.log               the Idempotency-Key index's checkpoint
//!   quarantine/                   damaged segments, tails and offset stores
//!   dead-letter/dead-letter.ndjson  records Kafka and the dead-letter topic refused
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const WAL_DIR: &str = "wal";
pub const OFFSETS_DIR: &str = "offsets";
pub const QUARANTINE_DIR: &str = "quarantine";
pub const DEAD_LETTER_DIR: &str = "dead-letter";
pub const DEAD_LETTER_FILE: &str = "dead-letter.ndjson";
pub const LOCK_FILE: &str = "LOCK";
/// The data directory's stable identity (see the `instance` module).
pub const INSTANCE_FILE: &str = "instance";

pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(WAL_DIR)
}

pub fn offsets_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(OFFSETS_DIR)
}

/// Named here for the layout; the file's format is the idempotency
/// index's (`keylog`).
pub const IDEMPOTENCY_LOG: &str = "idempotency.log";

pub fn idempotency_log(data_dir: &Path) -> PathBuf {
    data_dir.join(IDEMPOTENCY_LOG)
}

pub fn quarantine_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(QUARANTINE_DIR)
}

pub fn dead_letter_file(data_dir: &Path) -> PathBuf {
    data_dir.join(DEAD_LETTER_DIR).join(DEAD_LETTER_FILE)
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another sluice process ({1})")]
    Locked(PathBuf, String),
}

/// Holds `DATA_DIR/LOCK` with an exclusive `flock` for the life of the
/// process, so two daemons never share a data directory. The kernel drops the
/// lock when the process dies, so a crash never leaves a stale lock.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Locks `dir`, which must exist (the server creates it durably first).
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: dir.to_owned(),
            source,
        };
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => "unknown pid".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(LockError::Locked(dir.to_owned(), holder));
        }
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

/// Reads of the WAL or the offset store that failed while `serve` started
/// (the stream scan, the Idempotency-Key rebuild) and were retried there.
pub static STARTUP_READ_FAILURES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
