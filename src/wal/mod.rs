//! The segmented write-ahead log.
//!
//! # Layout
//! `wal/` holds segment files named by the zero-padded sequence number of
//! their first record (`00000000000000000001.wal`). Each starts with a 24-byte
//! header and continues with frames; the byte layout is in [`format`].
//! Sequence numbers start at 1 and are contiguous across segments, so the
//! records of a sealed segment are `first ..= next_segment.first - 1` and any
//! loss is an exactly countable range.
//!
//! # Invariants
//! 1. A sequence number is acknowledged (its append future resolves `Ok`) only
//!    after an `fdatasync` of the segment that holds it returned success, and,
//!    for a new segment, after its directory entry was fsynced too.
//! 2. Readers never see a record at or past [`Durable::next_seq`], which the
//!    writer publishes only after that fdatasync. Nothing not yet durable can
//!    reach Kafka, so a sequence number that was never durable may be reused
//!    after a crash without creating a conflicting duplicate.
//! 3. Only the active (last) segment is ever written, and only by the process
//!    that created it. Sealed segments are immutable until GC deletes them
//!    whole (recovery may cut the last segment a predecessor left).
//! 4. A failed write or fsync is sticky: the writer refuses every later
//!    append, and [`Wal::failed`] resolves so the process can exit. The
//!    kernel may have dropped the dirty pages (fsyncgate), so only a restart
//!    and recovery from what is really on disk is trustworthy.
//! 5. GC deletes a segment only when its last record is at or below a committed
//!    offset that the caller has already made durable. Segments are deleted in
//!    ascending order, so a crash mid-GC leaves a suffix, never a hole.
//!
//! # Recovery
//! Open lists the directory, checks every header (24 bytes each) and scans
//! only the last segment, after an fdatasync and from the device (`O_DIRECT`),
//! so bytes a failed fsync left only in the page cache count as never
//! written. A torn tail is cut; damage with intact frames after it is counted
//! exactly and those frames are kept. Every process appends to a fresh
//! segment of its own. Sealed segments are verified lazily by the reader as replay
//! reaches them, so startup cost does not grow with the backlog. See
//! `docs/design.md` for the full rules.

pub mod config;
pub mod format;
pub mod inspect;
/// The storage layer's file I/O (`crate::storage::io`), named here too: the WAL
/// is its first user, and its tests and benches reach it as `wal::io`.
pub use crate::storage::io;
mod reader;
pub mod record;
mod recovery;
pub mod segment;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

pub use reader::{Gap, GapReason, ReadItem, WalReader};
pub use record::{Record, DEFAULT_STREAM};
pub use recovery::RecoveryReport;

use self::io::Filesystem;

/// Tunables of the log. Sizes are in bytes.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory of segment files.
    pub dir: PathBuf,
    /// Where damaged files and cut tails are copied for inspection.
    pub quarantine_dir: PathBuf,
    /// A segment is sealed and a new one started once it reaches this size.
    /// Default 64 MiB.
    pub segment_bytes: u64,
    /// Appends are refused with [`WalError::Full`] past this many bytes of
    /// segments on disk. Default 8 GiB.
    pub max_bytes: u64,
    /// Appends are refused with [`WalError::DiskLow`] when the filesystem would
    /// be left with less than this free. Default 512 MiB.
    pub min_free_bytes: u64,
    /// One group commit writes at most about this many bytes before its
    /// fdatasync. Default 16 MiB.
    pub max_group_bytes: usize,
    /// Capacity of the append queue, in requests. Default 1024.
    pub queue_depth: usize,
}

impl WalConfig {
    /// Defaults for a data directory: segments in `data_dir/wal`, damaged
    /// copies in `data_dir/quarantine`.
    pub fn new(data_dir: &Path) -> Self {
        WalConfig {
            dir: crate::datadir::wal_dir(data_dir),
            quarantine_dir: crate::datadir::quarantine_dir(data_dir),
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 8 * 1024 * 1024 * 1024,
            min_free_bytes: 512 * 1024 * 1024,
            max_group_bytes: 16 * 1024 * 1024,
            queue_depth: 1024,
        }
    }
}

/// Errors of the log, split by what a caller should do about them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    /// The I/O error that made this WAL fail. Returned once, to the appends
    /// that were in the failing group; later appends get [`WalError::Failed`].
    #[error("WAL I/O error: {0}")]
    Io(Arc<std::io::Error>),
    /// Sticky: an earlier write or fsync failed and the log refuses writes
    /// until the process restarts and recovers.
    #[error("WAL refuses writes after an earlier failure: {0}")]
    Failed(Arc<str>),
    /// Over `max_bytes`; clears as replay lets GC delete segments.
    #[error("WAL is full: {used} of {max} bytes in use")]
    Full { used: u64, max: u64 },
    /// Free disk space below `min_free_bytes`.
    #[error("disk space low: {free} bytes free, {min} required")]
    DiskLow { free: u64, min: u64 },
    #[error("record of {len} bytes exceeds the {limit}-byte frame limit")]
    TooLarge { len: usize, limit: usize },
    #[error("an append needs at least one non-empty record")]
    Empty,
    /// The writer has stopped (shutdown).
    #[error("WAL is closed")]
    Closed,
}

impl WalError {
    fn io(e: std::io::Error) -> Self {
        WalError::Io(Arc::new(e))
    }
}

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

impl SeqRange {
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The durable frontier, published by the writer after every fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// Every record below this is durable; nothing at or above it may be read.
    pub next_seq: u64,
    /// First sequence number of the active segment.
    pub active_first: u64,
    /// Durable length in bytes of the active segment.
    pub active_len: u64,
}

/// Monotonic counters, for metrics and stats.
#[derive(Debug, Default)]
pub struct WalCounters {
    pub append_requests: AtomicU64,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_nanos: AtomicU64,
    pub segments_created: AtomicU64,
    pub segments_removed: AtomicU64,
    pub refused_full: AtomicU64,
    pub refused_disk_low: AtomicU64,
    pub truncated_bytes: AtomicU64,
    pub lost_records: AtomicU64,
    pub quarantined_files: AtomicU64,
    /// Damaged bytes that could not be copied to quarantine (disk full).
    pub quarantine_failures: AtomicU64,
}

/// A point-in-time summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WalStats {
    pub segments: usize,
    pub first_seq: Option<u64>,
    pub next_seq: u64,
    pub disk_bytes: u64,
    pub max_bytes: u64,
    pub failed: Option<String>,
    pub append_requests: u64,
    pub records: u64,
    pub fsyncs: u64,
    pub truncated_bytes: u64,
    pub lost_records: u64,
    pub quarantined_files: u64,
    pub quarantine_failures: u64,
}

/// Told about every group commit, e.g. to feed latency histograms. Called on
/// the writer thread: keep it cheap.
pub trait WalObserver: Send + Sync {
    fn group_committed(&self, records: u64, bytes: u64, fsync: std::time::Duration);
}

struct Shared {
    observer: std::sync::OnceLock<Arc<dyn WalObserver>>,
    cfg: WalConfig,
    fs: Arc<dyn Filesystem>,
    /// first_seq -> bytes on disk. The last entry is the active segment.
    segments: Mutex<BTreeMap<u64, u64>>,
    /// Serialises GC callers, so that `segments` need not stay locked (and
    /// block the writer's publish) across unlinks.
    gc: Mutex<()>,
    disk_bytes: AtomicU64,
    durable: watch::Sender<Durable>,
    failed: Mutex<Option<Arc<str>>>,
    /// Becomes true when the log fails, so that the process can end without
    /// waiting for a request to notice.
    failure: watch::Sender<bool>,
    counters: WalCounters,
    /// Last sequence numbers of loss ranges already reported, so that a range
    /// found again (by a restarted reader) is not counted twice.
    reported_losses: Mutex<std::collections::BTreeSet<u64>>,
}

impl Shared {
    fn segment_path(&self, first_seq: u64) -> PathBuf {
        self.cfg.dir.join(format::segment_name(first_seq))
    }

    fn failed(&self) -> Option<Arc<str>> {
        lock(&self.failed).clone()
    }

    fn set_failed(&self, why: String) {
        let mut f = lock(&self.failed);
        if f.is_none() {
            tracing::error!(error = %why, "WAL failed; refusing all further appends until restart");
            *f = Some(why.into());
            self.failure.send_replace(true);
        }
    }

    /// Counts and logs a lost range once.
    fn report_loss(&self, gap: &Gap) {
        if !lock(&self.reported_losses).insert(gap.last) {
            return;
        }
        self.counters
            .lost_records
            .fetch_add(gap.len(), Ordering::Relaxed);
        tracing::error!(
            first_seq = gap.first,
            last_seq = gap.last,
            records = gap.len(),
            reason = %gap.reason,
            "WAL records lost"
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded data stays consistent across a panic in our critical
    // sections (they only insert/remove map entries), so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run by the writer once an append is durable, before readers can see it.
pub type OnDurable = Box<dyn FnOnce(SeqRange) + Send>;

struct AppendRequest {
    payloads: Vec<Vec<u8>>,
    frame_bytes: u64,
    reply: oneshot::Sender<Result<SeqRange, WalError>>,
    /// Dropped uncalled if the append is refused or fails.
    on_durable: Option<OnDurable>,
}

/// The log. Share it behind an `Arc`; dropping the last handle stops the
/// writer after it has finished every queued append.
pub struct Wal {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<AppendRequest>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Wal {
    /// Opens (recovering) the log. `committed` is the durable committed offset:
    /// every record at or below it is consumed, and missing segments below it
    /// are not a loss.
    pub fn open(
        cfg: WalConfig,
        fs: Arc<dyn Filesystem>,
        committed: u64,
    ) -> Result<(Wal, RecoveryReport), WalError> {
        let (shared, active, report) = recovery::open(cfg, fs, committed)?;
        let shared = Arc::new(shared);
        let (tx, rx) = mpsc::channel(shared.cfg.queue_depth.max(1));
        let writer = writer::Writer::new(shared.clone(), active);
        let handle = std::thread::Builder::new()
            .name("sluice-wal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(WalError::io)?;
        Ok((
            Wal {
                shared,
                tx: Some(tx),
                writer: Some(handle),
            },
            report,
        ))
    }

    fn request(
        &self,
        payloads: Vec<Vec<u8>>,
    ) -> Result<(AppendRequest, oneshot::Receiver<Result<SeqRange, WalError>>), WalError> {
        if let Some(why) = self.shared.failed() {
            return Err(WalError::Failed(why));
        }
        if payloads.is_empty() || payloads.iter().any(|p| p.is_empty()) {
            return Err(WalError::Empty);
        }
        let limit = format::MAX_PAYLOAD_BYTES as usize;
        if let Some(p) = payloads.iter().find(|p| p.len() > limit) {
            return Err(WalError::TooLarge {
                len: p.len(),
                limit,
            });
        }
        let frame_bytes = payloads
            .iter()
            .map(|p| format::frame_len(p.len()) as u64)
            .sum();
        let (reply, rx) = oneshot::channel();
        Ok((
            AppendRequest {
                payloads,
                frame_bytes,
                reply,
                on_durable: None,
            },
            rx,
        ))
    }

    /// Appends encoded records as one unit and resolves with their sequence
    /// numbers once they are durable. If the future is dropped early, the
    /// records may still become durable (and be delivered) unacknowledged.
    pub async fn append(&self, payloads: Vec<Vec<u8>>) -> Result<SeqRange, WalError> {
        let (req, rx) = self.request(payloads)?;
        let tx = self.tx.as_ref().ok_or(WalError::Closed)?;
        tx.send(req).await.map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// [`Wal::append`], and `on_durable` runs on the writer thread after the
    /// fdatasync that makes the records durable and before they are published
    /// to readers (so state it installs is there before replay can see the
    /// records). Keep it cheap. If the append is refused or fails, it is
    /// dropped without being called.
    pub async fn append_with(
        &self,
        payloads: Vec<Vec<u8>>,
        on_durable: OnDurable,
    ) -> Result<SeqRange, WalError> {
        let (mut req, rx) = self.request(payloads)?;
        req.on_durable = Some(on_durable);
        let tx = self.tx.as_ref().ok_or(WalError::Closed)?;
        tx.send(req).await.map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// [`Wal::append`] for threads outside an async runtime.
    pub fn append_blocking(&self, payloads: Vec<Vec<u8>>) -> Result<SeqRange, WalError> {
        let (req, rx) = self.request(payloads)?;
        let tx = self.tx.as_ref().ok_or(WalError::Closed)?;
        tx.blocking_send(req).map_err(|_| WalError::Closed)?;
        rx.blocking_recv().map_err(|_| WalError::Closed)?
    }

    /// A reader positioned at `from_seq`. With `quarantine` set, damaged
    /// sealed segments it meets are copied to the quarantine directory.
    pub fn reader(&self, from_seq: u64) -> WalReader {
        WalReader::new(self.shared.clone(), from_seq)
    }

    /// Watches the durable frontier.
    pub fn durable(&self) -> watch::Receiver<Durable> {
        self.shared.durable.subscribe()
    }

    /// Deletes every sealed segment whose last record is at or below `seq`.
    /// The caller must have made `seq` durable as the committed offset first:
    /// a segment deleted before that would be a hole after a crash. Returns
    /// how many segments were removed.
    pub fn remove_through(&self, seq: u64) -> Result<usize, WalError> {
        let _gc = lock(&self.shared.gc);
        // Only segments with a successor (sealed), chosen under the lock; the
        // unlinks run without it so the writer can publish meanwhile.
        let doomed: Vec<u64> = {
            let segments = lock(&self.shared.segments);
            let firsts: Vec<u64> = segments.keys().copied().collect();
            firsts
                .windows(2)
                .take_while(|pair| pair[1] - 1 <= seq)
                .map(|pair| pair[0])
                .collect()
        };
        let mut removed = 0;
        // Ascending order: a crash part-way leaves a contiguous suffix.
        for first in doomed {
            match self.shared.fs.remove(&self.shared.segment_path(first)) {
                Ok(()) => {}
                // Already gone (removed by hand, or by an earlier attempt):
                // the goal is reached; stopping here would wedge GC forever.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(segment = %format::segment_name(first), "consumed segment was already gone");
                }
                Err(e) => return Err(WalError::io(e)),
            }
            let bytes = lock(&self.shared.segments).remove(&first).unwrap_or(0);
            self.shared.disk_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.shared
                .counters
                .segments_removed
                .fetch_add(1, Ordering::Relaxed);
            removed += 1;
        }
        // Unlinks need no directory fsync for correctness: a segment that comes
        // back after a crash lies below the committed offset and is removed by
        // the next open.
        Ok(removed)
    }

    /// Installs the group-commit observer; only the first call takes effect.
    pub fn set_observer(&self, observer: Arc<dyn WalObserver>) {
        let _ = self.shared.observer.set(observer);
    }

    /// False once the writer thread has exited (shutdown or a bug).
    pub fn writer_alive(&self) -> bool {
        self.writer.as_ref().is_some_and(|h| !h.is_finished())
    }

    pub fn counters(&self) -> &WalCounters {
        &self.shared.counters
    }

    /// The reason the log refuses writes, if it does.
    pub fn failure(&self) -> Option<Arc<str>> {
        self.shared.failed()
    }

    /// Fails the log from outside, as a failed fdatasync does: appends are
    /// refused from now on and the daemon ends with exit 1 (see
    /// [`Wal::failed`]). For a sink whose durable state this process can no
    /// longer trust (a failed fsync of its files or checkpoint): only a
    /// restart reads back what the disk holds.
    pub fn fail(&self, why: String) {
        self.shared.set_failed(why);
    }

    /// Resolves once the log has failed (at once if it already has). The
    /// daemon ends on this, whether or not a request was waiting.
    pub fn failed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shared.failure.subscribe();
        async move {
            // The sender lives in `Shared`; if it is dropped the log is gone
            // and there is nothing left to fail.
            if rx.wait_for(|&f| f).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn config(&self) -> &WalConfig {
        &self.shared.cfg
    }

    /// Bytes of segments on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.disk_bytes.load(Ordering::Relaxed)
    }

    /// Free bytes on the WAL's filesystem.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        self.shared.fs.free_bytes(&self.shared.cfg.dir)
    }

    pub fn stats(&self) -> WalStats {
        let segments = lock(&self.shared.segments);
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WalStats {
            segments: segments.len(),
            first_seq: segments.keys().next().copied(),
            next_seq: self.shared.durable.borrow().next_seq,
            disk_bytes: self.disk_bytes(),
            max_bytes: self.shared.cfg.max_bytes,
            failed: self.shared.failed().map(|s| s.to_string()),
            append_requests: get(&c.append_requests),
            records: get(&c.records),
            fsyncs: get(&c.fsyncs),
            truncated_bytes: get(&c.truncated_bytes),
            lost_records: get(&c.lost_records),
            quarantined_files: get(&c.quarantined_files),
            quarantine_failures: get(&c.quarantine_failures),
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit.
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// Copies bytes `range` of `src` into the quarantine directory as `name` and
/// fsyncs the copy and the directory, so the evidence is durable before the
/// caller changes anything else.
fn quarantine_copy(
    fs: &dyn Filesystem,
    quarantine_dir: &Path,
    counters: &WalCounters,
    src: &dyn self::io::WalFile,
    (from, to): (u64, u64),
    name: &str,
) -> std::io::Result<String> {
    fs.create_dir_all(quarantine_dir)?;
    // Never over an earlier incident's evidence.
    let name = &unique_quarantine_name(fs, quarantine_dir, name);
    let path = quarantine_dir.join(name);
    let copied = (|| {
        let dst = fs.create(&path)?;
        let mut buf = vec![0u8; 1024 * 1024];
        let mut off = from;
        while off < to {
            let want = ((to - off) as usize).min(buf.len());
            let n = segment::read_full(src, &mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            dst.write_all_at(&buf[..n], off - from)?;
            off += n as u64;
        }
        dst.sync_data()?;
        fs.sync_dir(quarantine_dir)
    })();
    if let Err(e) = copied {
        // A partial copy is no evidence, and on a full disk it holds the space
        // that recovery and replay need.
        let _ = fs.remove(&path);
        return Err(e);
    }
    counters.quarantined_files.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        file = name,
        bytes = to - from,
        "copied damaged WAL bytes to quarantine"
    );
    Ok(name.clone())
}

/// `base` with a suffix that no file in `dir` has: the start time in
/// milliseconds, and a counter if that is taken too. Evidence of an earlier
/// incident with the same segment name and offset is never replaced.
fn unique_quarantine_name(fs: &dyn Filesystem, dir: &Path, base: &str) -> String {
    let taken: std::collections::HashSet<String> =
        fs.list(dir).unwrap_or_default().into_iter().collect();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut name = format!("{base}.{stamp}");
    let mut n = 1u32;
    while taken.contains(&name) {
        name = format!("{base}.{stamp}-{n}");
        n += 1;
    }
    name
}

/// Whether `dir` holds evidence saved under `base` (by
/// [`unique_quarantine_name`]).
fn already_quarantined(fs: &dyn Filesystem, dir: &Path, base: &str) -> bool {
    let prefix = format!("{base}.");
    fs.list(dir)
        .unwrap_or_default()
        .iter()
        .any(|n| n == base || n.starts_with(&prefix))
}
