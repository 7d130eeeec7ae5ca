//! The archive checkpoint: one file, `DIR/checkpoint`, replaced atomically
//! (tmp, fsync, rename, directory fsync) by every commit.
//!
//! Format: a header line `sluice-archive-checkpoint 1 <crc32 hex>` and a
//! JSON body whose CRC-32 the header carries (a rename is atomic, so a torn
//! body means the disk returned something else than was written).
//!
//! Size: [`max_bytes`] derives the largest checkpoint a configuration
//! writes from its bounds (open hours, tracked values and their cap, path
//! patterns). A bigger one is not called corrupt (issue 26 item 1: a valid
//! 288 MB checkpoint kept the files sink down for good): it is read
//! streaming, with every tracked value cut as it arrives, and logged.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::analytics::{AnalyticsSpec, HourStats, CUT_MARK, MAX_VALUE_BYTES};
use super::layout::Hour;

pub const FILE: &str = "checkpoint";
const MAGIC: &str = "sluice-archive-checkpoint 1";
/// What [`max_bytes`] allows for the source's `progress` (the files sink's
/// is ~60 bytes; Kafka's is ~60 bytes per partition plus ~50 per producer
/// instance mark).
pub const PROGRESS_ALLOWANCE: u64 = 1 << 20;
/// Unparsed files open at once: the arrival hour, and the previous one
/// until it is sealed.
const UNPARSED_FILES: u64 = 4;

/// The largest checkpoint body a writer with these bounds writes: at most
/// `max_hours` hours, each with `3 + fields` dimensions of at most
/// `max_tracked` values of at most [`MAX_VALUE_BYTES`] (every byte escaped
/// as `\u00XX` at worst) plus the cut mark; one file per hour plus the
/// unparsed files, each path at most `path_bytes`; and the progress.
pub fn max_bytes(spec: &AnalyticsSpec, max_hours: usize, path_bytes: usize) -> u64 {
    const NUM: u64 = 20; // a u64 or i64 in decimal
    let esc = |n: usize| 6 * n as u64 + 2;
    let value = esc(MAX_VALUE_BYTES) + CUT_MARK.len() as u64 + 2 + NUM;
    let counter = spec.max_tracked as u64 * value + 60 + 3 * NUM;
    let dims = 3 + spec.fields.len() as u64;
    let names: u64 = spec.fields.iter().map(|f| esc(f.len()) + 2).sum();
    let hour = esc(13) + 1 + 120 + 4 * NUM + dims * counter + names;
    let hours = max_hours as u64;
    let file = esc(path_bytes) + 2 + NUM;
    100 + hours * hour + (hours + UNPARSED_FILES) * file + PROGRESS_ALLOWANCE
}

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

/// What a writer commits: a [`Checkpoint`] serialized from borrowed
/// counts (the same JSON), so that a commit holds no second copy of the
/// open hours' analytics.
#[derive(Debug, Serialize)]
pub struct CheckpointOut<'a> {
    pub files: BTreeMap<String, u64>,
    pub hours: BTreeMap<String, &'a HourStats>,
    pub unparsed_sealed_through: Option<i64>,
    pub progress: &'a Value,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    #[error("checkpoint {0} is corrupt ({1}); refusing to start: the files' committed lengths and the source position are unknown. Restore it, or move the directory away to archive from scratch")]
    Corrupt(String, String),
}

/// Reads `dir/checkpoint`; `Ok(None)` if there is none. Any size is read
/// (streaming: memory is the decoded checkpoint, whose tracked values are
/// cut as they arrive), and only a bad header, checksum or body is corrupt.
pub fn read(dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    Ok(read_sized(dir)?.map(|(cp, _)| cp))
}

/// [`read`], with the file's size (to compare with [`max_bytes`]).
pub fn read_sized(dir: &Path) -> Result<Option<(Checkpoint, u64)>, CheckpointError> {
    use std::io::BufRead;
    let path = dir.join(FILE);
    let name = path.display().to_string();
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::Io(name, e)),
    };
    let len = f
        .metadata()
        .map_err(|e| CheckpointError::Io(name.clone(), e))?
        .len();
    let corrupt = |m: String| CheckpointError::Corrupt(name.clone(), m);
    let mut r = std::io::BufReader::new(f);
    // The header is short: read at most 128 bytes of it.
    let mut header = Vec::new();
    std::io::Read::take(&mut r, 128)
        .read_until(b'\n', &mut header)
        .map_err(|e| CheckpointError::Io(name.clone(), e))?;
    if header.pop() != Some(b'\n') {
        return Err(corrupt("no header line".into()));
    }
    let header = std::str::from_utf8(&header).map_err(|_| corrupt("header is not UTF-8".into()))?;
    let crc = header
        .strip_prefix(MAGIC)
        .and_then(|rest| u32::from_str_radix(rest.trim(), 16).ok())
        .ok_or_else(|| corrupt(format!("bad header {header:?}")))?;
    // Two passes: the checksum over the whole body first (constant
    // memory), so that only a body sluice wrote is ever decoded; then the
    // decoding, streaming, tracked values cut as they arrive.
    let body_at = header.len() as u64 + 1;
    let mut hasher = Crc {
        inner: r,
        hasher: crc32fast::Hasher::new(),
    };
    std::io::copy(&mut hasher, &mut std::io::sink())
        .map_err(|e| CheckpointError::Io(name.clone(), e))?;
    if hasher.hasher.finalize() != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let mut r = hasher.inner;
    std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(body_at))
        .map_err(|e| CheckpointError::Io(name.clone(), e))?;
    let cp = serde_json::from_reader::<_, Checkpoint>(r).map_err(|e| {
        if e.is_io() {
            CheckpointError::Io(name.clone(), std::io::Error::other(e.to_string()))
        } else {
            corrupt(format!("body: {e}"))
        }
    })?;
    Ok(Some((cp, len)))
}

/// A reader that hashes what passes through it.
struct Crc<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: std::io::Read> std::io::Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Replaces the checkpoint durably. When this returns Ok, the new
/// checkpoint survives a crash; if the process dies before the rename the
/// old one is intact, and after it the directory fsync makes the new name
/// stick. Returns the checkpoint's size in bytes.
pub fn write<T: Serialize>(dir: &Path, cp: &T) -> std::io::Result<u64> {
    // One buffer: the header's fixed width reserved, the body serialized
    // after it, then the header with the body's CRC written over the
    // reservation (no second copy of a large body).
    let header_len = MAGIC.len() + " 00000000\n".len();
    let mut bytes = vec![b' '; header_len];
    serde_json::to_writer(&mut bytes, cp).map_err(std::io::Error::other)?;
    let header = format!("{MAGIC} {:08x}\n", crc32fast::hash(&bytes[header_len..]));
    bytes[..header_len].copy_from_slice(header.as_bytes());
    // `checkpoint.tmp`, fsync, rename, directory fsync. A failed fsync comes
    // back as `durable::is_fsync_failure`: the caller must not read the
    // checkpoint back in this process (the page cache may hold a name the
    // disk does not).
    crate::durable::write_file_durable(&dir.join(FILE), &bytes)?;
    Ok(bytes.len() as u64)
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

    #[test]
    fn a_valid_checkpoint_past_the_bound_is_read_with_values_cut() {
        let d = tempfile::tempdir().unwrap();
        let spec = AnalyticsSpec {
            max_tracked: 2,
            fields: vec!["path".into()],
            ..Default::default()
        };
        let mut cp = Checkpoint::default();
        let mut h = HourStats::default();
        // What a build without the cap wrote: 3 MB values, 2 sharing their
        // first 256 bytes.
        let long = |c: char| format!("/{}", c.to_string().repeat(3 << 20));
        let mut path = super::super::analytics::Counter::default();
        path.counts.insert(long('a'), 2);
        path.counts.insert(format!("{}x", long('a')), 3);
        path.counts.insert(long('é'), 1);
        h.fields.insert("path".into(), path);
        cp.hours.insert("2026-11-26T12".into(), h);
        let len = write(d.path(), &cp).unwrap();
        let bound = max_bytes(&spec, 3, 40);
        let small = max_bytes(&spec, 3, 40) - PROGRESS_ALLOWANCE;
        assert!(small < 200_000 && len > bound, "{len} {bound}");
        let (back, read_len) = read_sized(d.path()).unwrap().unwrap();
        assert_eq!(read_len, len);
        let counts = &back.hours["2026-11-26T12"].fields["path"].counts;
        assert_eq!(
            counts.len(),
            2,
            "{:?}",
            counts.keys().map(|k| k.len()).collect::<Vec<_>>()
        );
        for (k, n) in counts {
            assert!(k.len() <= MAX_VALUE_BYTES + CUT_MARK.len() && k.ends_with(CUT_MARK));
            assert!(*n == 5 || *n == 1, "{k}: {n}");
        }
    }
}
