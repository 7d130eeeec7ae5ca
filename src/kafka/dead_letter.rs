//! The last resort for a record that neither its topic nor the dead-letter
//! topic would take: one NDJSON line per record in
//! `DATA_DIR/dead-letter/dead-letter.ndjson`, fdatasynced before the
//! committed offset may pass the record.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::wal::Record;

pub struct DeadLetterFile {
    path: PathBuf,
}

impl DeadLetterFile {
    pub fn new(data_dir: &Path) -> Self {
        DeadLetterFile {
            path: data_dir.join("dead-letter").join("dead-letter.ndjson"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the record and fdatasyncs. Values that are JSON are embedded
    /// as JSON; anything else as base64.
    pub fn append(&self, seq: u64, topic: &str, error: &str, r: &Record) -> std::io::Result<()> {
        let dir = self.path.parent().expect("has a parent");
        let dir_created = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let file_created = !self.path.exists();
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
        let mut line = serde_json::to_vec(&serde_json::json!({
            "seq": seq,
            "topic": topic,
            "error": error,
            "key": r.key.as_deref().map(String::from_utf8_lossy),
            "timestamp_ms": r.timestamp_ms,
            "headers": headers,
            "value": value,
        }))?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        // A new file (or directory) is durable only once its entry is.
        if file_created {
            std::fs::File::open(dir)?.sync_all()?;
        }
        if dir_created {
            if let Some(parent) = dir.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
        Ok(())
    }
}
