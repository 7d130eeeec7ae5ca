//! The archive checkpoint: what a commit makes durable besides the lines.
//! Format 2 (issue 26 item 2) splits it so that a commit's cost follows
//! what changed, not what is open:
//!
//! ```text
//! DIR/checkpoint                      main: progress, every open file's durable length,
//!                                     unparsed_sealed_through, and for each open hour
//!                                     the generation of its stats file
//! DIR/checkpoint.d/<hour>.<gen>.json  one open hour's analytics (HourStats), written
//!                                     only by a commit in which the hour changed
//! ```
//!
//! Every file is a header line `<magic> <version> <crc32>` and a JSON body
//! whose CRC-32 the header carries ([`format`]): the main file
//! `sluice-archive-checkpoint 2`, with the body `{"generation", "files",
//! "hours": {"2026-11-26T12": 17}, "unparsed_sealed_through", "progress"}`;
//! an hour file `sluice-archive-hour 1`, with the body `{"hour", "stats"}`.
//!
//! **Commit** ([`Store::commit`]), in this order:
//! 1. each changed hour's stats to `checkpoint.d/<hour>.<gen>.json.tmp`,
//!    fsync, rename (a new name: the generation is the commit's, never
//!    reused); then one fsync of `checkpoint.d/`;
//! 2. the main file: `checkpoint.tmp`, fsync, rename, fsync of `DIR`; it
//!    names each unchanged hour's previous generation and each changed
//!    hour's new one;
//! 3. the generations no longer named (an hour rewritten, an hour sealed)
//!    are unlinked.
//!
//! A death before 2's rename leaves the old main file, whose generations
//! are all still on disk (nothing is unlinked before step 3), and new hour
//! files that no main file names: garbage, removed at the next open
//! ([`Store::remove_unnamed`], counted in a log line). A death after it
//! leaves the new main file, whose hour files were durable (1's directory
//! fsync) before it was renamed into place; the old generations left are
//! garbage. There is no third state.
//!
//! **Format 1** (before issue 26 item 2): one file, `sluice-archive-checkpoint
//! 1`, with every open hour's stats inline, rewritten whole by every commit
//! (17 MB for 64 hours of 1,000 distinct 300-byte paths, to commit one
//! line). It is read as before; the next commit writes every hour's file and
//! a format-2 main file over it. A format this build does not know is
//! refused with [`CheckpointError::Version`]: guessing could lose the
//! committed lengths.
//!
//! **Size**: [`Bounds`] derives the largest files a configuration writes
//! from its bounds (open hours, tracked values and their cap, path
//! patterns). A bigger one is not called corrupt (issue 26 item 1: a valid
//! 288 MB checkpoint kept the files sink down for good): it is read
//! streaming, with every tracked value cut as it arrives, and the writer
//! logs and counts it.

mod format;
mod store;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::analytics::{AnalyticsSpec, HourStats, CUT_MARK, MAX_VALUE_BYTES};
use super::layout::Hour;

pub use store::{HourRef, Opened, Store, UnreadableHour, Written};

/// The main file, in the archive directory.
pub const FILE: &str = "checkpoint";
/// The directory of the open hours' stats files, in the archive directory
/// (no layout pattern may use it: `Layout::new` refuses).
pub const HOURS_DIR: &str = "checkpoint.d";
const MAIN_MAGIC: &str = "sluice-archive-checkpoint";
/// The main file's format this build writes; it reads 1 and 2.
pub const VERSION: u32 = 2;
const MAIN_VERSIONS: &[u32] = &[1, 2];
const HOUR_MAGIC: &str = "sluice-archive-hour";
const HOUR_VERSIONS: &[u32] = &[1];
/// What [`Bounds`] allows for the source's `progress` (the files sink's
/// is ~60 bytes; Kafka's is ~60 bytes per partition plus ~50 per producer
/// instance mark).
pub const PROGRESS_ALLOWANCE: u64 = 1 << 20;
/// Unparsed files open at once: the arrival hour, and the previous one
/// until it is sealed.
const UNPARSED_FILES: u64 = 4;
/// A u64 or i64 in decimal.
const NUM: u64 = 20;

/// The largest checkpoint files a writer with these settings writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The main file (format 2).
    pub main: u64,
    /// One hour's stats file.
    pub hour: u64,
    /// A format-1 file (every hour inline), or all of format 2's files
    /// together.
    pub whole: u64,
}

impl Bounds {
    /// At most `max_hours` hours, each with `3 + fields` dimensions of at
    /// most `max_tracked` values of at most [`MAX_VALUE_BYTES`] (every byte
    /// escaped as `\u00XX` at worst) plus the cut mark; one file per hour
    /// plus the unparsed files, each path at most `path_bytes`; and the
    /// progress.
    pub fn new(spec: &AnalyticsSpec, max_hours: usize, path_bytes: usize) -> Bounds {
        let esc = |n: usize| 6 * n as u64 + 2;
        let value = esc(MAX_VALUE_BYTES) + CUT_MARK.len() as u64 + 2 + NUM;
        let counter = spec.max_tracked as u64 * value + 60 + 3 * NUM;
        let dims = 3 + spec.fields.len() as u64;
        let names: u64 = spec.fields.iter().map(|f| esc(f.len()) + 2).sum();
        let stats = 120 + 4 * NUM + dims * counter + names;
        let key = esc(13) + 1;
        let hours = max_hours as u64;
        let file = esc(path_bytes) + 2 + NUM;
        let main = 100 + NUM + hours * (key + NUM) + (hours + UNPARSED_FILES) * file;
        let hour = 100 + key + stats;
        Bounds {
            main: main + PROGRESS_ALLOWANCE,
            hour,
            whole: main + PROGRESS_ALLOWANCE + hours * hour,
        }
    }
}

/// A checkpoint as read, in either format: the open hours' stats resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Checkpoint {
    /// Durable length of every file still being written, by path relative
    /// to the directory. Files of sealed hours are not here: their
    /// summary holds their length.
    pub files: BTreeMap<String, u64>,
    /// Analytics of the hours still being written, by hour key.
    pub hours: BTreeMap<String, HourStats>,
    /// Unparsed files of arrival hours up to this one are complete.
    pub unparsed_sealed_through: Option<i64>,
    /// The source's position (opaque to the writer).
    pub progress: Value,
}

/// What a writer commits, borrowing the counts (a commit holds no second
/// copy of the open hours' analytics).
#[derive(Debug)]
pub struct CheckpointOut<'a> {
    pub files: BTreeMap<String, u64>,
    /// Each open hour's counts, and whether they changed since the last
    /// commit (only then is its file written).
    pub hours: BTreeMap<String, (&'a HourStats, bool)>,
    pub unparsed_sealed_through: Option<i64>,
    pub progress: &'a Value,
}

impl<'a> CheckpointOut<'a> {
    /// A fresh directory's checkpoint: nothing open, no progress.
    pub fn empty(progress: &'a Value) -> Self {
        CheckpointOut {
            files: BTreeMap::new(),
            hours: BTreeMap::new(),
            unparsed_sealed_through: None,
            progress,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    #[error("checkpoint {0} is corrupt ({1}); refusing to start: the files' committed lengths and the source position are unknown. Restore it, or move the directory away to archive from scratch")]
    Corrupt(String, String),
    #[error("checkpoint {0} is {1}; refusing to start rather than guess its committed lengths. Run the sluice version that wrote it, or move the directory away to archive from scratch")]
    Version(String, String),
    #[error("checkpoint file {0} cannot be read ({1}); the next start of the archive rebuilds this open hour's counts from its file")]
    Hour(String, String),
}

/// Reads the checkpoint of `dir` (`Ok(None)` if there is none), every hour
/// file it names included; an hour file that is missing or damaged is an
/// error here ([`CheckpointError::Hour`]; a writer's open rebuilds the
/// hour instead: [`Store::open`]). Any size is read (streaming: memory is
/// the decoded checkpoint, whose tracked values are cut as they arrive).
/// Safe while a writer commits: a main file replaced under the read is
/// read again.
pub fn read(dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let Some(l) = store::load(dir)? else {
        return Ok(None);
    };
    if let Some(u) = l.unreadable.first() {
        let file = u.file.as_ref().map_or_else(
            || dir.join(FILE).display().to_string(),
            |f| f.display().to_string(),
        );
        return Err(CheckpointError::Hour(file, u.reason.clone()));
    }
    Ok(Some(l.cp))
}

/// The open hours a checkpoint names, decoded one entry at a time: an entry
/// whose key is not an hour this build can name (`+10000-01-01T00`, written
/// by a build that let an event time past year 9999 through) comes back in
/// the second list instead of failing the whole checkpoint.
pub fn hour_entries(cp: &Checkpoint) -> (Vec<(Hour, HourStats)>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (key, stats) in &cp.hours {
        match hour_of_key(key) {
            Some(h) => good.push((h, stats.clone())),
            None => bad.push(key.clone()),
        }
    }
    (good, bad)
}

/// The hour `key` names, if it is exactly an hour key this build writes
/// (so it is also safe as a file name: no `/`, no leading `.`).
fn hour_of_key(key: &str) -> Option<Hour> {
    Hour::parse(key).filter(|h| h.key() == key)
}

/// Keeps a copy of `file` (the main file, or an hour file) as
/// `DIR/checkpoint.unreadable-<crc32 of its bytes>` (durably) before an
/// open drops entries it cannot read, so that an operator can still see
/// what they held. Named by content: an open repeated on the same file (a
/// sink retrying) finds its copy and returns `false` instead of piling up
/// copies. Top-level files are not the layout's: nothing removes it.
pub fn quarantine(dir: &Path, file: &Path) -> std::io::Result<(PathBuf, bool)> {
    let bytes = std::fs::read(file)?;
    let to = dir.join(format!("{FILE}.unreadable-{:08x}", crc32fast::hash(&bytes)));
    if to.exists() {
        return Ok((to, false));
    }
    crate::storage::durable::write_file_durable(&to, &bytes)?;
    Ok((to, true))
}

/// Writes `cp` in format 1 (every hour inline), as builds before issue 26
/// item 2 did: the fixture of the upgrade tests.
#[cfg(test)]
pub(crate) fn write_v1(dir: &Path, cp: &Checkpoint) -> std::io::Result<u64> {
    let bytes = format::encode(MAIN_MAGIC, 1, cp)?;
    crate::storage::durable::write_file_durable(&dir.join(FILE), &bytes)?;
    Ok(bytes.len() as u64)
}
