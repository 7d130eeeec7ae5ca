//! The data directory's stable identity: `DATA_DIR/instance`, created once.
//!
//! Sequence numbers are unique only within one data directory, so a consumer
//! that deduplicates on `seq` needs to know which directory a record came
//! from. Every Kafka record carries this id in the `instance` header next to
//! `seq`; `/stats` shows it.

use std::path::Path;
use std::sync::OnceLock;

/// Name of the file inside the data directory.
pub const FILE: &str = crate::datadir::INSTANCE_FILE;
/// Length of an id: a UUID in its hyphenated form.
pub const ID_LEN: usize = 36;

static CURRENT: OnceLock<String> = OnceLock::new();

/// The id of the data directory this process serves, once [`load_or_create`]
/// has run (`None` in tools and tests that never open one).
pub fn current() -> Option<&'static str> {
    CURRENT.get().map(String::as_str)
}

/// Reads `DATA_DIR/instance`, or creates it durably, and makes it
/// [`current`]. The first id a process installs stays for its life.
///
/// `reuse`: why sequence numbers would be handed out again under an
/// existing id (the caller's check: the next seq is 1, or at or below what
/// was already produced), if they would. A consumer applying the rule would
/// then drop every new event as a repeat of one it saw, so the id is
/// replaced by a new one (logged with the reason, and counted in
/// [`rotations`]).
///
/// Creation: write `instance.tmp`, fsync it, rename, fsync the directory.
/// Dying before the rename leaves the old file (or none) and a `.tmp` that
/// the next start overwrites; no record was produced with the new id yet,
/// because replay starts only after this returns. After the rename and
/// before the directory fsync, a power cut may bring the old id back: still
/// before any record carries the new one, and the next start replaces it
/// again.
pub fn load_or_create(data_dir: &Path, reuse: Option<&str>) -> std::io::Result<String> {
    let path = data_dir.join(FILE);
    let id = match std::fs::read(&path) {
        Ok(bytes) => {
            let old = parse(&bytes).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold an instance id (a UUID): refusing to start under another identity; restore it or remove it to start a new one",
                        path.display()
                    ),
                )
            })?;
            if let Some(why) = reuse {
                let id = write_new(data_dir)?;
                ROTATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(old_instance = %old, instance = %id, reason = %why, "sequence numbers would be handed out again under the existing instance id: took a new instance id, so that consumers applying the (instance, partition, seq) rule do not drop new events as repeats");
                id
            } else {
                old
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = write_new(data_dir)?;
            tracing::info!(instance = %id, "new data directory identity created");
            id
        }
        Err(e) => return Err(e),
    };
    Ok(CURRENT.get_or_init(|| id).clone())
}

/// Instance ids replaced at start because the sequence started over.
static ROTATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times this process replaced its instance id (0 or 1), for
/// `sluice_instance_rotations_total`.
pub fn rotations() -> u64 {
    ROTATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A new id, durable under `DATA_DIR/instance` before this returns.
fn write_new(data_dir: &Path) -> std::io::Result<String> {
    let id = uuid::Uuid::now_v7().hyphenated().to_string();
    // `instance.tmp`, fsync, rename, directory fsync.
    crate::storage::replace_durably(&data_dir.join(FILE), format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// A valid file holds one UUID and an optional newline.
fn parse(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?.trim_end_matches('\n');
    let id = uuid::Uuid::parse_str(text).ok()?;
    let id = id.hyphenated().to_string();
    (id == text).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_stable_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path(), Some("test")).unwrap();
        assert_eq!(a.len(), ID_LEN);
        let on_disk = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(on_disk.trim_end(), a);
        assert!(!dir.path().join("instance.tmp").exists());
        // Read back, not recreated.
        assert_eq!(parse(on_disk.as_bytes()).as_deref(), Some(a.as_str()));
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        let err = load_or_create(dir.path(), None).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
