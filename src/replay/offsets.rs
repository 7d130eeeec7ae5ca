//! The committed offset: every WAL record at or below it has been confirmed by
//! Kafka (or dead-lettered). Stored in sled, then made durable with a real
//! fsync of sled's files before `commit` returns.
//!
//! Why "make the offset durable, then delete segments" is safe: GC removes
//! only segments whose last record is at or below an offset that is already
//! on disk. A crash after the fsync and before the unlink leaves extra
//! consumed segments, which the next open deletes. A crash before the fsync
//! leaves the old offset and every segment above it, so the records are
//! produced again (a duplicate, never a loss). The reverse order could leave
//! an offset pointing past a deleted segment's predecessor: a hole.
//!
//! sled 0.34's `flush()` ends in `sync_file_range(2)`, which writes the pages
//! but flushes neither the inode's metadata nor the disk's write cache, and
//! its own `fsync` runs from a background timer. So `commit` follows the flush
//! with `sync_all` on every file of the store and on its directory (fsync acts
//! on the inode, so our own descriptor is enough); sled's timer is turned off
//! so that every write to the store happens inside a commit.
//!
//! The same store keeps the *fates* of sequence numbers that did not reach the
//! topic: ranges that recovery or replay found unreadable (`lost`) and records
//! sent to the dead-letter topic or file. They are few (one entry per range or
//! dead letter), written before the commit that passes them, and made durable
//! by that commit; receipts read them.
//!
//! A store that will not open (sled refuses it, panics on it, or it holds a
//! malformed value) or is missing while the WAL holds segments never stops
//! the daemon: [`OffsetStore::open_or_reset`] moves it to `quarantine/` and
//! restarts from just below the oldest retained segment. Everything below that
//! segment was committed, since GC only removes committed segments, so this
//! produces duplicates, never a false loss report.

use std::path::{Path, PathBuf};

use super::partition::{PartitionMap, Pin};

const KEY: &[u8] = b"committed";
/// sled tree of fates: key = first seq (big-endian), value = last seq
/// (big-endian) followed by one [`Fate`] byte.
const FATES: &[u8] = b"fates";
/// Tree: each topic's pinned partition counts (see `partition.rs`). Key:
/// topic length (u16 big-endian), topic, first seq (u64 big-endian); value:
/// [`Pin::encode_value`].
const PINS: &[u8] = b"partition_pins";
/// Default tree key: the first seq partitioned by sluice itself (u64
/// big-endian). Absent in a store written by a build before pinning: every
/// seq below the WAL's end at the first start of a pinning build may have
/// been produced by librdkafka's `consistent_random` partitioner.
const PINNING_SINCE: &[u8] = b"partition_pinning_since";
/// Default tree key: the WAL's last durable seq under the current instance
/// id as of a commit (u64 big-endian); written inside each commit.
const DURABLE_THROUGH: &[u8] = b"wal_durable_through";

/// Raises the recorded durable-through mark to `seq` (never lowers it),
/// from inside a commit (the `before_flush` hook), so that the commit's
/// flush and fsync make it durable. Every seq a process ever produced was
/// durable in the WAL first, so at the next start a WAL that ends below
/// this mark lost records (deleted, or damaged and cut) that consumers may
/// have seen: their numbers must not be handed out again under this id.
pub fn note_durable_through(db: &sled::Db, seq: u64) -> sled::Result<()> {
    let current = db
        .get(DURABLE_THROUGH)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    if seq > current {
        db.insert(DURABLE_THROUGH, &seq.to_be_bytes())?;
    }
    Ok(())
}

/// sled's page cache. sled's default (1 GiB) held every idempotency row a
/// second time in memory (the index holds them already) and let the daemon
/// grow by gigabytes under keyed traffic. The store's hot rows are few (the
/// offset, fates, pins, the watermark); the idempotency rows are written
/// once a checkpoint and read back only at open, so a small cache costs
/// only the open's reads.
pub const CACHE_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("offset store: {0}")]
    Sled(#[from] sled::Error),
    #[error("offset store holds a malformed value ({0} bytes, expected 8)")]
    Malformed(usize),
    #[error("offset store: fsync of {path}: {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("offset store could not be opened ({reason}) nor moved aside: {source}")]
    Quarantine {
        reason: String,
        source: std::io::Error,
    },
}

/// What became of a sequence number that did not reach the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Recovery or replay found it unreadable: it will never be delivered.
    Lost,
    /// Kafka refused it permanently; it is in the dead-letter topic.
    DeadLetteredTopic,
    /// Kafka and the dead-letter topic refused it; it is in the dead-letter
    /// file.
    DeadLetteredFile,
}

impl Fate {
    fn to_byte(self) -> u8 {
        match self {
            Fate::Lost => 1,
            Fate::DeadLetteredTopic => 2,
            Fate::DeadLetteredFile => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Fate> {
        match b {
            1 => Some(Fate::Lost),
            2 => Some(Fate::DeadLetteredTopic),
            3 => Some(Fate::DeadLetteredFile),
            _ => None,
        }
    }
}

/// Why [`OffsetStore::open_or_reset`] started a fresh store.
#[derive(Debug, Clone)]
pub struct Reset {
    /// What was wrong with the old store.
    pub reason: String,
    /// Where the old store went, if there was one.
    pub quarantined: Option<PathBuf>,
    /// The committed offset the fresh store starts from.
    pub committed: u64,
}

pub struct OffsetStore {
    db: sled::Db,
    fates: sled::Tree,
    dir: PathBuf,
    /// Runs inside every commit, before the flush, so what it writes (the
    /// idempotency checkpoint) is durable with the offset it precedes.
    before_flush: std::sync::OnceLock<BeforeFlush>,
    /// Set while partition pins were written to sled but their fsync has
    /// not succeeded: sled's memory then shows pins the disk may not hold,
    /// so reading them syncs first (a failed fsync is not trusted).
    pins_unsynced: std::sync::atomic::AtomicBool,
    /// Held by a whole commit (and by what [`OffsetStore::commit_then`]
    /// runs after it): the replayer's commit and GC, and the periodic
    /// idempotency checkpoint's commit, never interleave, so the only
    /// writes to the store between a commit's fsync and its GC's unlinks
    /// are none.
    commit_lock: std::sync::Mutex<()>,
}

/// See [`OffsetStore::set_before_flush`].
pub type BeforeFlush = Box<dyn Fn(&sled::Db) -> sled::Result<()> + Send + Sync>;

impl OffsetStore {
    /// Opens the store at `dir`, creating it if needed; fails on a store sled
    /// cannot read. The daemon uses [`OffsetStore::open_or_reset`].
    pub fn open(dir: &Path) -> Result<Self, OffsetError> {
        let created = !dir.exists();
        let open_once = || {
            // sled panics on some damaged files instead of returning an error.
            std::panic::catch_unwind(|| {
                sled::Config::new()
                    .path(dir)
                    // Every write happens in `commit`, which fsyncs itself.
                    .flush_every_ms(None)
                    .cache_capacity(CACHE_BYTES)
                    .open()
            })
            .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                sled::Error::Unsupported(format!("sled panicked opening the store: {why}"))
            })
        };
        // sled releases its file lock from background threads after the
        // last handle is dropped, so an open right after a close in this
        // process can find it still held for a moment. Another process
        // holding it (an offline tool) still fails the open after this wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match open_once()? {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let fates = db.open_tree(FATES)?;
        let store = OffsetStore {
            db,
            fates,
            dir: dir.to_owned(),
            before_flush: std::sync::OnceLock::new(),
            pins_unsynced: std::sync::atomic::AtomicBool::new(false),
            commit_lock: std::sync::Mutex::new(()),
        };
        store.committed()?;
        // A store we just created is durable only once its files, its
        // directory and the directory's entry in the data dir are.
        store.sync()?;
        if created {
            if let Some(parent) = dir.parent() {
                sync_path(parent)?;
            }
        }
        Ok(store)
    }

    /// Opens `DATA_DIR/offsets`. If it is unreadable, or missing while
    /// `wal_dir` holds segments, moves it to `DATA_DIR/quarantine/` and
    /// starts a fresh store whose committed offset is just below the oldest
    /// retained segment (durable before this returns). Fails only on I/O
    /// errors that recovery cannot work around (the store cannot be moved or
    /// created).
    pub fn open_or_reset(
        data_dir: &Path,
        wal_dir: &Path,
    ) -> Result<(Self, Option<Reset>), OffsetError> {
        let dir = crate::datadir::offsets_dir(data_dir);
        let existed = dir.join("db").exists() || dir.join("conf").exists();
        let reason = if existed {
            match Self::open(&dir) {
                Ok(store) => return reset_if_rolled_back(store, wal_dir),
                // Another process (an offline tool) holds sled's lock: the
                // store is fine, so it must not be quarantined. Failing the
                // start lets systemd retry once the tool is done.
                Err(OffsetError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock") =>
                {
                    return Err(OffsetError::Sled(sled::Error::Io(e)));
                }
                Err(e) => e.to_string(),
            }
        } else {
            match oldest_segment(wal_dir) {
                // A fresh data dir, or a WAL that starts at 1: nothing to guess.
                None | Some(1) => return Ok((Self::open(&dir)?, None)),
                Some(_) => "the offset store is missing but the WAL holds segments".to_string(),
            }
        };
        let quarantine = |source| OffsetError::Quarantine {
            reason: reason.clone(),
            source,
        };
        let quarantined = if dir.exists() {
            let qdir = crate::datadir::quarantine_dir(data_dir);
            crate::storage::create_dir_all_durable(&qdir).map_err(quarantine)?;
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let to = qdir.join(format!("offsets-{stamp}"));
            // The rename is durable once both directories are: this fsyncs
            // `quarantine/` and the data dir.
            crate::storage::rename_durable(&dir, &to).map_err(quarantine)?;
            Some(to)
        } else {
            None
        };
        let committed = oldest_segment(wal_dir).map_or(0, |first| first - 1);
        let store = Self::open(&dir)?;
        store.commit(committed)?;
        // The retained records were most likely produced by this build, so
        // they keep sluice's own partitioning (see `pinning_since`); the
        // counts pinned in the quarantined store are lost with it.
        store.set_pinning_since(1)?;
        Ok((
            store,
            Some(Reset {
                reason,
                quarantined,
                committed,
            }),
        ))
    }

    /// The committed offset; 0 when nothing was ever committed (sequence
    /// numbers start at 1).
    pub fn committed(&self) -> Result<u64, OffsetError> {
        match self.db.get(KEY)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| OffsetError::Malformed(v.len()))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Raises the committed offset to `seq` and makes it (and every fate
    /// recorded before) durable before returning: sled's flush, then an fsync
    /// of each of its files and of its directory. Lower values are ignored:
    /// the offset never moves back.
    pub fn commit(&self, seq: u64) -> Result<u64, OffsetError> {
        self.commit_then(seq, || ()).map(|(c, ())| c)
    }

    /// [`OffsetStore::commit`], then `after` (GC of what the commit covers)
    /// before another commit may start. `after` runs only if the commit
    /// succeeded.
    pub fn commit_then<T>(
        &self,
        seq: u64,
        after: impl FnOnce() -> T,
    ) -> Result<(u64, T), OffsetError> {
        // The guarded data is `()`: a panic in another commit leaves
        // nothing inconsistent to see.
        let _serial = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.commit_locked(seq)?;
        Ok((current, after()))
    }

    fn commit_locked(&self, seq: u64) -> Result<u64, OffsetError> {
        // The hook (the idempotency checkpoint, fdatasynced) runs before the
        // offset moves, even in sled's memory: any later flush of the store
        // (this one, a partition pin's, the one at shutdown) may make the
        // offset durable, and the offset must never be durable past a
        // checkpoint that failed (keys acknowledged above the log's
        // watermark would then be neither in the log nor rescanned).
        if let Some(hook) = self.before_flush.get() {
            hook(&self.db)?;
        }
        let mut current = self.committed()?;
        while seq > current {
            let old = (current > 0).then(|| current.to_be_bytes());
            match self
                .db
                .compare_and_swap(KEY, old, Some(&seq.to_be_bytes()))?
            {
                Ok(()) => current = seq,
                Err(_) => current = self.committed()?,
            }
        }
        self.db.flush()?;
        // If we die here the offset may still be only in the page cache (or
        // the disk's cache): no segment has been deleted yet, so the worst
        // case is records produced again.
        self.sync()?;
        Ok(current)
    }

    /// Installs a write that every [`OffsetStore::commit`] makes before its
    /// flush and fsync (only the first call takes effect). A commit at or
    /// below the current offset still runs it and syncs.
    pub fn set_before_flush(&self, hook: BeforeFlush) {
        let _ = self.before_flush.set(hook);
    }

    /// The underlying database, for trees that share the offset's fsync.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Records the fate of `first..=last`. Not durable by itself: the next
    /// [`OffsetStore::commit`] makes it so, and must come after this call for
    /// the offset to pass these numbers.
    pub fn record_fate(&self, first: u64, last: u64, fate: Fate) -> Result<(), OffsetError> {
        let mut value = [0u8; 9];
        value[..8].copy_from_slice(&last.to_be_bytes());
        value[8] = fate.to_byte();
        self.fates.insert(first.to_be_bytes(), &value[..])?;
        Ok(())
    }

    /// The recorded fate of `seq`, if any.
    pub fn fate(&self, seq: u64) -> Result<Option<Fate>, OffsetError> {
        // Ranges never overlap in practice; the latest starting at or below
        // `seq` is the one that can cover it.
        let Some(entry) = self.fates.range(..=seq.to_be_bytes()).next_back() else {
            return Ok(None);
        };
        let (_, value) = entry?;
        if value.len() != 9 {
            return Err(OffsetError::Malformed(value.len()));
        }
        let mut last = [0u8; 8];
        last.copy_from_slice(&value[..8]);
        if u64::from_be_bytes(last) < seq {
            return Ok(None);
        }
        Ok(Fate::from_byte(value[8]))
    }

    /// Every pin of `topic`, in rising first seq. A pin that does not decode
    /// is left out and reported in the error list (the caller logs it); the
    /// pins around it still hold.
    pub fn partition_pins(&self, topic: &str) -> Result<(PartitionMap, Vec<String>), OffsetError> {
        if self
            .pins_unsynced
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // An earlier pin write's fsync failed: what sled shows may not
            // be on disk. Sync it now, or fail, before anyone produces by it.
            self.db.flush()?;
            self.sync()?;
            self.pins_unsynced
                .store(false, std::sync::atomic::Ordering::Release);
        }
        let tree = self.db.open_tree(PINS)?;
        let prefix = pin_prefix(topic);
        let mut pins = Vec::new();
        let mut damaged = Vec::new();
        for entry in tree.scan_prefix(&prefix) {
            let (k, v) = entry?;
            let from = k
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            match from.and_then(|from| Pin::decode_value(from, &v)) {
                Some(pin) => pins.push(pin),
                None => damaged.push(format!("key {:?}, value {:?}", k.as_ref(), v.as_ref())),
            }
        }
        Ok((PartitionMap::new(pins), damaged))
    }

    /// Adds pins for `topic` and makes them durable (flush and fsync) before
    /// returning: a record may be produced under a pin only once the pin
    /// would survive a power cut, or a restart could partition it anew.
    pub fn add_partition_pins(&self, topic: &str, pins: &[Pin]) -> Result<(), OffsetError> {
        let tree = self.db.open_tree(PINS)?;
        let mut batch = sled::Batch::default();
        for pin in pins {
            let mut key = pin_prefix(topic);
            key.extend_from_slice(&pin.from_seq.to_be_bytes());
            batch.insert(key, &pin.encode_value()[..]);
        }
        self.pins_unsynced
            .store(true, std::sync::atomic::Ordering::Release);
        tree.apply_batch(batch)?;
        self.db.flush()?;
        self.sync()?;
        self.pins_unsynced
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The WAL's durable end as of the last commit that recorded it (see
    /// [`note_durable_through`]); 0 if none was recorded.
    pub fn durable_through(&self) -> Result<u64, OffsetError> {
        match self.db.get(DURABLE_THROUGH)? {
            None => Ok(0),
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| OffsetError::Malformed(v.len())),
        }
    }

    /// Forgets the durable-through mark (a new instance id starts with
    /// none), durably.
    pub fn reset_durable_through(&self) -> Result<(), OffsetError> {
        self.db.remove(DURABLE_THROUGH)?;
        self.db.flush()?;
        self.sync()
    }

    /// The first seq that sluice partitioned itself, if recorded.
    pub fn pinning_since(&self) -> Result<Option<u64>, OffsetError> {
        match self.db.get(PINNING_SINCE)? {
            None => Ok(None),
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(|b| Some(u64::from_be_bytes(b)))
                .map_err(|_| OffsetError::Malformed(v.len())),
        }
    }

    /// Records [`OffsetStore::pinning_since`] once (a later call keeps the
    /// first value) and makes it durable; returns the value in force.
    pub fn set_pinning_since(&self, seq: u64) -> Result<u64, OffsetError> {
        if let Some(since) = self.pinning_since()? {
            return Ok(since);
        }
        self.db.insert(PINNING_SINCE, &seq.to_be_bytes())?;
        self.db.flush()?;
        self.sync()?;
        Ok(seq)
    }

    /// fsyncs every file of the store, then its directory (sled creates and
    /// renames snapshot files without syncing the directory).
    fn sync(&self) -> Result<(), OffsetError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| OffsetError::Sync { path, source }
        };
        for entry in std::fs::read_dir(&self.dir).map_err(err(&self.dir))? {
            let entry = entry.map_err(err(&self.dir))?;
            let path = entry.path();
            match std::fs::File::open(&path).and_then(|f| crate::storage::sync_file(&f, &path)) {
                Ok(()) => {}
                // sled removes old snapshots on its own.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&path)(e)),
            }
        }
        sync_path(&self.dir)
    }
}

fn pin_prefix(topic: &str) -> Vec<u8> {
    let t = topic.as_bytes();
    let len = u16::try_from(t.len()).unwrap_or(u16::MAX);
    let mut key = Vec::with_capacity(2 + t.len() + 8);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(t);
    key
}

/// The body of `GET /v1/receipts/{seq}`: `written` says the number was
/// assigned and fsynced, `committed` is the committed offset and `fate` what
/// the store recorded for `seq`.
pub fn receipt(seq: u64, written: bool, committed: u64, fate: Option<Fate>) -> serde_json::Value {
    let (status, dead_letter) = match fate {
        Some(Fate::Lost) => ("lost", None),
        Some(Fate::DeadLetteredTopic) => ("dead_lettered", Some("topic")),
        Some(Fate::DeadLetteredFile) => ("dead_lettered", Some("file")),
        None if !written => ("unknown", None),
        None if seq <= committed => ("delivered", None),
        None => ("pending", None),
    };
    let mut body = serde_json::json!({
        "seq": seq,
        // A lost record was written once, but what is on disk is unreadable.
        "durable": written && fate != Some(Fate::Lost),
        // In the topic: not lost, not dead-lettered, and confirmed.
        "delivered": status == "delivered",
        "status": status,
    });
    if let Some(target) = dead_letter {
        body["dead_letter"] = target.into();
    }
    body
}

fn sync_path(path: &Path) -> Result<(), OffsetError> {
    crate::storage::sync_dir(path).map_err(|source| OffsetError::Sync {
        path: path.to_owned(),
        source,
    })
}

/// The first sequence number of the oldest segment in `wal_dir`, if any.
fn oldest_segment(wal_dir: &Path) -> Option<u64> {
    std::fs::read_dir(wal_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| crate::wal::format::parse_segment_name(e.file_name().to_str()?))
        .min()
}

/// A store that opens may still have lost writes (an emptied or truncated
/// file that sled reads as an older state). GC deletes only segments at or
/// below a committed offset that was durable first, so an offset below the
/// oldest retained segment minus one cannot be what was last committed:
/// treat it as a reset, and commit just below that segment before the WAL
/// opens, so that recovery does not report delivered records as lost.
fn reset_if_rolled_back(
    store: OffsetStore,
    wal_dir: &Path,
) -> Result<(OffsetStore, Option<Reset>), OffsetError> {
    let committed = store.committed()?;
    let Some(oldest) = oldest_segment(wal_dir) else {
        return Ok((store, None));
    };
    if committed.saturating_add(1) >= oldest {
        return Ok((store, None));
    }
    let floor = oldest - 1;
    store.commit(floor)?;
    store.set_pinning_since(1)?;
    Ok((
        store,
        Some(Reset {
            reason: format!(
                "the committed offset {committed} is below the oldest retained WAL segment (first sequence {oldest}): the store lost writes; sequences {}..={floor} are taken as delivered",
                committed + 1
            ),
            quarantined: None,
            committed: floor,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = OffsetStore::open(dir.path()).unwrap();
            assert_eq!(s.committed().unwrap(), 0);
            assert_eq!(s.commit(10).unwrap(), 10);
            assert_eq!(s.commit(5).unwrap(), 10, "never moves back");
        }
        let s = OffsetStore::open(dir.path()).unwrap();
        assert_eq!(s.committed().unwrap(), 10);
    }

    #[test]
    fn a_store_locked_by_another_process_is_not_quarantined() {
        let data = tempfile::tempdir().unwrap();
        let wal = data.path().join("wal");
        let held = OffsetStore::open(&data.path().join("offsets")).unwrap();
        held.commit(7).unwrap();
        let err = OffsetStore::open_or_reset(data.path(), &wal).err();
        assert!(
            err.is_some_and(|e| e.to_string().contains("lock")),
            "a held lock is an error to retry, not damage"
        );
        assert!(!data.path().join("quarantine").exists());
        drop(held);
        // sled releases its file lock when its last internal handle goes,
        // which can be a moment after the drop: retry while it is held.
        let t0 = std::time::Instant::now();
        let (store, reset) = loop {
            match OffsetStore::open_or_reset(data.path(), &wal) {
                Ok(opened) => break opened,
                Err(e) if e.to_string().contains("lock") && t0.elapsed().as_secs() < 10 => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(reset.is_none());
        assert_eq!(store.committed().unwrap(), 7);
    }

    #[test]
    fn fates_are_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = OffsetStore::open(dir.path()).unwrap();
            s.record_fate(5, 9, Fate::Lost).unwrap();
            s.record_fate(12, 12, Fate::DeadLetteredFile).unwrap();
            s.commit(20).unwrap();
        }
        let s = OffsetStore::open(dir.path()).unwrap();
        assert_eq!(s.fate(4).unwrap(), None);
        assert_eq!(s.fate(5).unwrap(), Some(Fate::Lost));
        assert_eq!(s.fate(9).unwrap(), Some(Fate::Lost));
        assert_eq!(s.fate(10).unwrap(), None);
        assert_eq!(s.fate(12).unwrap(), Some(Fate::DeadLetteredFile));
        assert_eq!(s.fate(13).unwrap(), None);
    }

    #[test]
    fn a_store_rolled_back_below_the_oldest_segment_is_reset_to_just_below_it() {
        let data = tempfile::tempdir().unwrap();
        let wal = data.path().join("wal");
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::write(wal.join(crate::wal::format::segment_name(501)), b"").unwrap();
        OffsetStore::open(&data.path().join("offsets"))
            .unwrap()
            .commit(120)
            .unwrap();
        let (store, reset) = OffsetStore::open_or_reset(data.path(), &wal).unwrap();
        let reset = reset.expect("a reset");
        assert_eq!(reset.committed, 500);
        assert!(reset.quarantined.is_none());
        assert!(reset.reason.contains("121..=500"), "{}", reset.reason);
        assert_eq!(store.committed().unwrap(), 500);
        drop(store);
        // Consistent now: no second reset.
        let (store, reset) = OffsetStore::open_or_reset(data.path(), &wal).unwrap();
        assert!(reset.is_none());
        assert_eq!(store.committed().unwrap(), 500);
    }

    /// Hostile review D1: a failed checkpoint hook must not leave the new
    /// offset in sled's memory, where any later flush (a partition pin's,
    /// the one at shutdown) would make it durable past the checkpoint.
    #[test]
    fn a_failed_hook_leaves_the_offset_where_it_was_for_every_later_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        {
            let s = OffsetStore::open(&path).unwrap();
            let calls = std::sync::atomic::AtomicU32::new(0);
            s.set_before_flush(Box::new(move |_| {
                if calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                    Ok(())
                } else {
                    Err(sled::Error::Unsupported("disk full".into()))
                }
            }));
            assert_eq!(s.commit(10).unwrap(), 10);
            assert!(s.commit(20).is_err());
            assert_eq!(s.committed().unwrap(), 10);
            // What a shutdown does: flush and sync without the hook.
            s.db().flush().unwrap();
            s.sync().unwrap();
        }
        let s = OffsetStore::open(&path).unwrap();
        assert_eq!(s.committed().unwrap(), 10);
    }
}
