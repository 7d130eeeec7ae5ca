//! The archive checkpoint: one file, `DIR/checkpoint`, replaced atomically
//! (tmp, fsync, rename, directory fsync) by every commit.
//!
//! Format: a header line `sluice-archive-checkpoint 1 <crc32 hex>` and a
//! JSON body whose CRC-32 the header carries (a rename is atomic, so a torn
//! body means the disk returned something else than was written).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::analytics::HourStats;
use super::layout::Hour;

pub const FILE: &str = "checkpoint";
const MAGIC: &str = "sluice-archive-checkpoint 1";
/// A checkpoint holds at most the open hours; anything bigger is not ours.
const MAX_BYTES: u64 = 256 << 20;

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

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    #[error("checkpoint {0} is corrupt ({1}); refusing to start: the files' committed lengths and the source position are unknown. Restore it, or move the directory away to archive from scratch")]
    Corrupt(String, String),
}

/// Reads `dir/checkpoint`; `Ok(None)` if there is none.
pub fn read(dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let path = dir.join(FILE);
    let name = path.display().to_string();
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::Io(name, e)),
    };
    if meta.len() > MAX_BYTES {
        return Err(CheckpointError::Corrupt(
            name,
            format!("{} bytes", meta.len()),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| CheckpointError::Io(name.clone(), e))?;
    parse(&bytes)
        .map(Some)
        .map_err(|m| CheckpointError::Corrupt(name, m))
}

fn parse(bytes: &[u8]) -> Result<Checkpoint, String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not UTF-8")?;
    let crc = header
        .strip_prefix(MAGIC)
        .and_then(|rest| u32::from_str_radix(rest.trim(), 16).ok())
        .ok_or_else(|| format!("bad header {header:?}"))?;
    let body = &bytes[nl + 1..];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("body: {e}"))
}

/// Replaces the checkpoint durably. When this returns Ok, the new
/// checkpoint survives a crash; if the process dies before the rename the
/// old one is intact, and after it the directory fsync makes the new name
/// stick.
pub fn write(dir: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let body = serde_json::to_vec(cp).map_err(std::io::Error::other)?;
    let mut bytes = format!("{MAGIC} {:08x}\n", crc32fast::hash(&body)).into_bytes();
    bytes.extend_from_slice(&body);
    // `checkpoint.tmp`, fsync, rename, directory fsync. A failed fsync comes
    // back as `durable::is_fsync_failure`: the caller must not read the
    // checkpoint back in this process (the page cache may hold a name the
    // disk does not).
    crate::durable::write_file_durable(&dir.join(FILE), &bytes)
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    crate::durable::sync_dir(dir)
}

/// The open hours a checkpoint names, decoded one entry at a time: an entry
/// whose key is not an hour this build can name (`+10000-01-01T00`, written
/// by a build that let an event time past year 9999 through) comes back in
/// the second list instead of failing the whole checkpoint.
pub fn hour_entries(cp: &Checkpoint) -> (Vec<(Hour, HourStats)>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (key, stats) in &cp.hours {
        match Hour::parse(key).filter(|h| h.key() == *key) {
            Some(h) => good.push((h, stats.clone())),
            None => bad.push(key.clone()),
        }
    }
    (good, bad)
}

/// Keeps a copy of the checkpoint as `checkpoint.unreadable-<crc32 of its
/// bytes>` (durably, next to it) before an open drops entries it cannot
/// read, so that an operator can still see what they held. Named by content:
/// an open repeated on the same checkpoint (a sink retrying) finds its copy
/// and returns `false` instead of piling up copies.
pub fn quarantine(dir: &Path) -> std::io::Result<(std::path::PathBuf, bool)> {
    let bytes = std::fs::read(dir.join(FILE))?;
    let to = dir.join(format!("{FILE}.unreadable-{:08x}", crc32fast::hash(&bytes)));
    if to.exists() {
        return Ok((to, false));
    }
    crate::durable::write_file_durable(&to, &bytes)?;
    Ok((to, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let d = tempfile::tempdir().unwrap();
        assert!(read(d.path()).unwrap().is_none());
        let mut cp = Checkpoint::default();
        cp.files.insert("logs/a".into(), 42);
        cp.progress = serde_json::json!({"next": {"0": 7}});
        write(d.path(), &cp).unwrap();
        assert_eq!(read(d.path()).unwrap(), Some(cp));
        let path = d.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read(d.path()).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }
}
