//! The `[wal]` section (the file's form of [`super::WalConfig`], which adds
//! the data dir).

use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct WalSettings {
    /// Segment size before a roll. Default 64 MiB.
    pub segment_bytes: u64,
    /// Quota on bytes of segments; past it ingest answers 503. Default 8 GiB.
    pub max_bytes: u64,
    /// Free disk space to keep; below it ingest answers 503. Default 512 MiB.
    pub min_free_bytes: u64,
    /// Upper bound of one group commit. Default 16 MiB.
    pub max_group_bytes: u64,
    /// Append requests queued for the writer. Default 1024.
    pub queue_depth: usize,
}

impl Default for WalSettings {
    fn default() -> Self {
        WalSettings {
            segment_bytes: 64 * MIB,
            max_bytes: 8 * GIB,
            min_free_bytes: 512 * MIB,
            max_group_bytes: 16 * MIB,
            queue_depth: 1024,
        }
    }
}

impl WalSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.segment_bytes < 4096 {
            return Err("wal.segment-bytes must be at least 4096".into());
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err(format!(
                "wal.max-bytes ({}) must hold at least two segments of wal.segment-bytes ({})",
                self.max_bytes, self.segment_bytes
            ));
        }
        Ok(())
    }
}
