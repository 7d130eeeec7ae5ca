//! The last resort for a record that neither its topic nor the dead-letter
//! topic would take: one NDJSON line per record in
//! `DATA_DIR/dead-letter/dead-letter.ndjson`, fdatasynced before the
//! committed offset may pass the record.
//!
//! Every line is a whole JSON object ending in `\n`. A write cut short (ENOSPC,
//! a kill mid-`write`) leaves a partial last line; its record was never
//! acknowledged (the offset did not pass it), so it will be written again.
//! At start ([`DeadLetterFile::repair_tail`]), or else before the first
//! append of a process, and after any failed append, the file is truncated
//! back to its last `\n`, so a partial line never swallows the next record.

use crate::storage;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;

use crate::wal::Record;

/// Bytes read back at a time while looking for the last `\n`.
const TAIL_CHUNK: u64 = 64 * 1024;

pub struct DeadLetterFile {
    path: PathBuf,
    /// Set until the tail was checked (first append of this process) and
    /// again after a failed append. Also means the directory entry is not
    /// yet known to be durable: a previous process may have died between
    /// creating the file and syncing its directory.
    check_tail: AtomicBool,
}

/// What an append did besides appending.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Bytes of a partial last line that were cut first (0 if none).
    pub truncated_partial: u64,
}

impl DeadLetterFile {
    pub fn new(data_dir: &Path) -> Self {
        DeadLetterFile {
            path: crate::datadir::dead_letter_file(data_dir),
            check_tail: AtomicBool::new(true),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run at start: cuts a partial last line left by the previous process
    /// (so the file is line-parseable even if no record is ever appended
    /// again), makes the cut and the file's directory entry durable, and
    /// returns how many bytes were cut. No file is no work.
    pub fn repair_tail(&self) -> std::io::Result<u64> {
        let mut f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                sync_dir_entry_if_present(&self.path)?;
                self.check_tail.store(false, Ordering::Relaxed);
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        let cut = truncate_partial_line(&mut f)?;
        if cut > 0 {
            storage::sync_file_data(&f, &self.path)?;
        }
        // An earlier process may have died between creating the file and
        // syncing its directory.
        sync_dir_and_parent(self.path.parent().expect("has a parent"))?;
        self.check_tail.store(false, Ordering::Relaxed);
        Ok(cut)
    }

    /// Appends the record and fdatasyncs. Values that are JSON are embedded
    /// as JSON; anything else as base64.
    pub fn append(
        &self,
        seq: u64,
        topic: &str,
        error: &str,
        r: &Record,
    ) -> std::io::Result<Appended> {
        let result = self.append_inner(seq, topic, error, r);
        if result.is_err() {
            // A short write may have left part of this line behind.
            self.check_tail.store(true, Ordering::Relaxed);
        }
        result
    }

    fn append_inner(
        &self,
        seq: u64,
        topic: &str,
        error: &str,
        r: &Record,
    ) -> std::io::Result<Appended> {
        let dir = self.path.parent().expect("has a parent");
        // `dead-letter/` (and any missing parent) durable before a line
        // goes in it: created, then it and its parent fsynced.
        crate::storage::durable::create_dir_durable(dir)?;
        let value = match serde_json::from_slice::<serde_json::Value>(&r.value) {
            Ok(v) => serde_json::json!({ "json": v }),
            Err(_) => serde_json::json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(&r.value)
            }),
        };
        let headers: serde_json::Map<_, _> = r
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into()))
            .collect();
        // `instance` names the sequence `seq` belongs to (a data directory
        // can take a new instance id while this file stays); redrive sends
        // it as `origin-instance`.
        let mut line = serde_json::to_vec(&serde_json::json!({
            "seq": seq,
            "instance": crate::instance::current(),
            "topic": topic,
            "error": error,
            "key": r.key.as_deref().map(String::from_utf8_lossy),
            "timestamp_ms": r.timestamp_ms,
            "headers": headers,
            "value": value,
        }))?;
        line.push(b'\n');
        // Whether this call created the file, from the open itself rather than
        // a racy exists() check.
        let (mut f, file_created) = match std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
        {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
                std::fs::OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(&self.path)?,
                false,
            ),
            Err(e) => return Err(e),
        };
        let check = self.check_tail.load(Ordering::Relaxed);
        let mut appended = Appended::default();
        if check && !file_created {
            appended.truncated_partial = truncate_partial_line(&mut f)?;
            if appended.truncated_partial > 0 {
                storage::sync_file_data(&f, &self.path)?;
            }
        }
        storage::append(&mut f, &self.path, &line)?;
        // The line is durable only once the file's directory entry is: sync
        // the directory whenever we created the file, and once per process
        // for a file an earlier process created (it may have died before its
        // own directory sync).
        if file_created || check {
            storage::sync_dir(dir)?;
        }
        // An earlier process may have died between its mkdir and the
        // parent's fsync: sync the parent once per process too.
        if check {
            if let Some(parent) = dir.parent() {
                storage::sync_dir(parent)?;
            }
        }
        self.check_tail.store(false, Ordering::Relaxed);
        Ok(appended)
    }
}

/// Cuts the file back to just after its last `\n` (to 0 if it has none).
/// Returns how many bytes were cut.
fn truncate_partial_line(f: &mut std::fs::File) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; TAIL_CHUNK as usize];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(TAIL_CHUNK);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        f.set_len(keep)?;
        tracing::error!(
            file_bytes = len,
            cut_from = keep,
            cut_bytes = len - keep,
            "dead-letter file ended in a partial line (a write cut short): truncated it; that record is written again"
        );
    }
    Ok(len - keep)
}

/// With no file yet, `dead-letter/` may still exist: a process that died
/// after creating it and before fsyncing the data dir leaves an entry that a
/// power cut can drop, and with it every line written there later (appends
/// then sync only `dead-letter/`). Sync both directories whenever it exists.
fn sync_dir_entry_if_present(file: &Path) -> std::io::Result<()> {
    let dir = file.parent().expect("has a parent");
    if !dir.is_dir() {
        return Ok(());
    }
    sync_dir_and_parent(dir)
}

/// fsyncs `dir` and its parent (the data dir).
fn sync_dir_and_parent(dir: &Path) -> std::io::Result<()> {
    storage::sync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        storage::sync_dir(parent)?;
    }
    Ok(())
}
