//! The archive writer: lines into hourly files, analytics alongside, and
//! one `commit` that makes both durable together with the source's
//! position. See the module documentation of [`crate::archive`].

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::analytics::{AnalyticsSpec, HourStats, Summary};
use super::checkpoint::{self, CheckpointError, CheckpointOut, Opened, Store};
use super::layout::{Hour, Kind, Layout, MAX_EVENT_MS, MIN_EVENT_MS};

/// How the writer behaves. `Default` is the Log Pipeline's layout.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub dir: PathBuf,
    pub layout: Layout,
    pub analytics: AnalyticsSpec,
    /// Field holding the event time (RFC 3339 string, or epoch seconds or
    /// milliseconds as a number). `timestamp`.
    pub timestamp_field: String,
    /// Files kept open at once; the least recently written is flushed,
    /// fdatasynced and closed to make room. 64.
    pub max_open_files: usize,
    /// A file's buffer is written to the OS when it reaches this size
    /// (and at every commit). 256 KiB.
    pub buffer_bytes: usize,
    /// A file not written for this long is closed at the next commit and
    /// its hour sealed (summary written durably, dropped from memory and
    /// from the checkpoint). 5 minutes.
    pub idle_close: Duration,
    /// zstd-compress a sealed hour's file into `<file>.zst` (the summary
    /// keeps its counts; a late event decompresses it first). Off.
    pub compress_sealed: bool,
    /// Open hours (analytics in memory and in the checkpoint) kept after a
    /// commit; the least recently written beyond it are sealed (hours
    /// outside [`FAR_PAST_HOURS`]/[`FAR_FUTURE_HOURS`] of the clock first).
    /// Between commits at most twice as many: past that
    /// [`Writer::wants_commit`] asks the source to commit. 64.
    pub max_open_hours: usize,
}

/// An event more than this many hours older than the wall clock is "far
/// past": archived in its hour like any other, counted, and its hour is
/// among the first sealed when open hours pass the bound.
pub const FAR_PAST_HOURS: i64 = 24 * 7;
/// ... and more than this many hours ahead of it, "far future".
pub const FAR_FUTURE_HOURS: i64 = 1;

impl WriterOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WriterOptions {
            dir: dir.into(),
            layout: Layout::default(),
            analytics: AnalyticsSpec::default(),
            timestamp_field: "timestamp".into(),
            max_open_files: 64,
            buffer_bytes: 256 << 10,
            idle_close: Duration::from_secs(300),
            compress_sealed: false,
            max_open_hours: 64,
        }
    }

    /// The largest checkpoint files these options write
    /// ([`checkpoint::Bounds`]).
    pub fn checkpoint_bounds(&self) -> checkpoint::Bounds {
        let h = Hour::parse("2026-01-01T00").unwrap_or(Hour(0));
        let path = [
            self.layout.log(h),
            self.layout.unparsed(h),
            zst_path(&self.layout.log(h)),
        ]
        .iter()
        .map(|p| p.as_os_str().len())
        .max()
        .unwrap_or(0);
        checkpoint::Bounds::new(&self.analytics, 2 * self.max_open_hours.max(1) + 1, path)
    }
}

/// Counters for metrics, readable from other threads.
#[derive(Debug, Default)]
pub struct WriterMetrics {
    pub lines: AtomicU64,
    pub bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub unparsed: AtomicU64,
    pub files_open: AtomicU64,
    pub commits: AtomicU64,
    /// Duration of the last commit (write, fdatasync, checkpoint), µs.
    pub last_commit_micros: AtomicU64,
    /// Files truncated or removed on open (uncommitted tails).
    pub recovered_files: AtomicU64,
    /// Checkpoint entries an open could not read (an hour key or a file
    /// outside what this build can name, an hour file in `checkpoint.d/`
    /// missing or damaged) and dropped, after keeping a copy of the
    /// checkpoint. The lines stay in their files.
    pub checkpoint_entries_dropped: AtomicU64,
    /// Hours whose counts an open rebuilt from the file on disk.
    pub hours_rebuilt: AtomicU64,
    /// Tracked values longer than `analytics::MAX_VALUE_BYTES`, counted
    /// under their cut form.
    pub values_cut: AtomicU64,
    /// Hours sealed because open hours passed `max_open_hours` (not idle).
    pub files_sealed_over_bound: AtomicU64,
    /// Events more than [`FAR_PAST_HOURS`] before / [`FAR_FUTURE_HOURS`]
    /// after the wall clock (archived in their hour all the same).
    pub events_far_past: AtomicU64,
    pub events_far_future: AtomicU64,
    /// Size of the committed checkpoint (the main file and every hour file
    /// it names) after the last commit, or as read at open, bytes.
    pub checkpoint_bytes: AtomicU64,
    /// Bytes the last commit wrote to the checkpoint: the main file and the
    /// files of the hours that changed (issue 26 item 2: was the whole
    /// checkpoint, every open hour's counts, at every commit).
    pub checkpoint_written_bytes: AtomicU64,
    /// Checkpoint files larger than these options' bounds
    /// ([`WriterOptions::checkpoint_bounds`]): read at open (written by
    /// other bounds or an older build) or written (a bug). Never refused.
    pub checkpoint_over_bound: AtomicU64,
}

/// Where `append` put a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    Hour(Hour),
    /// Not valid JSON, or no usable timestamp (the reason).
    Unparsed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Inconsistent(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |e| ArchiveError::Io(path.display().to_string(), e)
}

impl ArchiveError {
    /// A failed fsync (of a file, a directory, or the checkpoint). After
    /// one, what this process reads back may be the page cache's and not the
    /// disk's (a checkpoint renamed into place whose directory fsync failed
    /// reads as committed): the writer must not be reopened in the same
    /// process. The files sink stops the daemon (exit 1); `sluice archive`
    /// exits. A restart reads what the disk really holds.
    pub fn is_sticky(&self) -> bool {
        matches!(self, ArchiveError::Io(_, e) if crate::storage::durable::is_fsync_failure(e))
    }
}

/// fdatasync of an archive file; a failure is [`ArchiveError::is_sticky`].
fn sync_data(f: &File, path: &Path) -> Result<(), ArchiveError> {
    crate::storage::durable::sync_file_data(f, path).map_err(io(path))
}

struct OpenFile {
    kind: Kind,
    hour: Hour,
    handle: Option<File>,
    buf: Vec<u8>,
    /// Bytes handed to the OS (not counting `buf`).
    written: u64,
    /// Written since the last fdatasync.
    unsynced: bool,
    last_write: Instant,
    tick: u64,
}

/// Read access to the analytics for the HTTP listener and `sluice
/// analytics`: committed counts of open hours, summaries for the rest.
#[derive(Clone)]
pub struct AnalyticsView {
    dir: PathBuf,
    layout: Layout,
    top_n: usize,
    /// The open hours' committed counts, published by a running writer at
    /// each commit; `None` offline, where the checkpoint file has them.
    committed: Option<Arc<Mutex<HashMap<Hour, HourStats>>>>,
}

impl AnalyticsView {
    /// An offline view of a directory (no writer running).
    pub fn offline(dir: impl Into<PathBuf>, layout: Layout, top_n: usize) -> Self {
        AnalyticsView {
            dir: dir.into(),
            layout,
            top_n,
            committed: None,
        }
    }

    /// The open hours' committed counts: from the writer, or read once
    /// from the checkpoint.
    fn open_hours(&self) -> Result<HashMap<Hour, HourStats>, String> {
        if let Some(m) = &self.committed {
            return m
                .lock()
                .map(|m| m.clone())
                .map_err(|_| "poisoned".to_string());
        }
        let cp = checkpoint::read(&self.dir).map_err(|e| e.to_string())?;
        Ok(cp
            .map(|cp| {
                cp.hours
                    .into_iter()
                    .filter_map(|(k, v)| Some((Hour::parse(&k)?, v)))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn lookup(
        &self,
        open: &HashMap<Hour, HourStats>,
        h: Hour,
    ) -> Result<Option<HourStats>, String> {
        if let Some(s) = open.get(&h) {
            return Ok(Some(s.clone()));
        }
        // Sealed hours: the summary was made durable before the checkpoint
        // stopped naming the hour.
        read_summary(&self.dir, &self.layout, h).map(|s| s.map(|s| s.stats))
    }

    /// The committed analytics of hour `h`, if it has any line.
    pub fn hour(&self, h: Hour) -> Result<Option<HourStats>, String> {
        self.lookup(&self.open_hours()?, h)
    }

    /// The summary document of hour `h`.
    pub fn summary(&self, h: Hour) -> Result<Option<Summary>, String> {
        Ok(self
            .hour(h)?
            .map(|s| s.summary(&h.key(), &self.layout.log(h).to_string_lossy(), self.top_n)))
    }

    /// Hours `from..=to` merged into one summary (at most 31 days).
    pub fn range(&self, from: Hour, to: Hour) -> Result<Summary, String> {
        if to < from || to.0 - from.0 > 24 * 31 {
            return Err("range must have from <= to and span at most 31 days".into());
        }
        let mut total = HourStats::default();
        let open = self.open_hours()?;
        for h in from.0..=to.0 {
            if let Some(s) = self.lookup(&open, Hour(h))? {
                total.merge(&s);
            }
        }
        Ok(total.summary(&format!("{}/{}", from.key(), to.key()), "", self.top_n))
    }
}

fn read_summary(dir: &Path, layout: &Layout, h: Hour) -> Result<Option<Summary>, String> {
    let path = dir.join(layout.summary(h));
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// See [`crate::archive`].
pub struct Writer {
    opts: WriterOptions,
    files: HashMap<PathBuf, OpenFile>,
    hours: HashMap<Hour, HourStats>,
    /// Hours changed since the last commit.
    dirty_hours: BTreeSet<Hour>,
    /// Directories whose entries changed since the last commit.
    dirs_to_sync: BTreeSet<PathBuf>,
    unparsed_sealed_through: Option<i64>,
    /// The checkpoint's files: what the durable main file names.
    store: Store,
    open: usize,
    tick: u64,
    metrics: Arc<WriterMetrics>,
    view: AnalyticsView,
    /// Set after an I/O error: what is on disk is unknown until reopened.
    broken: bool,
    /// When the last "sealed over the bound" / "far times" lines were
    /// logged (at most one of each per [`LOG_EVERY`]).
    logged_bound: Option<Instant>,
    logged_far: Option<Instant>,
    far_at_last_log: u64,
}

/// Rate of the writer's repeated warnings.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Writer {
    /// Opens (or creates) the directory: reads the checkpoint, truncates
    /// every file to its committed length, removes files created after it,
    /// and returns the writer with the `progress` the last commit saved
    /// (`Value::Null` for a fresh directory).
    pub fn open(opts: WriterOptions) -> Result<(Writer, Value), ArchiveError> {
        let dir = opts.dir.clone();
        // Every missing level created and fsynced with its parent; and the
        // root's own entry and contents fsynced even if it existed: a
        // process that died between its mkdir and those fsyncs left a
        // directory a power cut can still drop, with every file in it. So
        // the main checkpoint file read next is one the disk holds (a kill
        // right after its rename may have left the name in the page cache
        // only).
        crate::storage::durable::create_dir_durable(&dir).map_err(io(&dir))?;
        crate::storage::durable::sync_dir(&dir).map_err(io(&dir))?;
        let up = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        crate::storage::durable::sync_dir(up).map_err(io(up))?;
        let (mut store, opened) = Store::open(&dir)?;
        let metrics = Arc::new(WriterMetrics::default());
        let opened = match opened {
            Some(o) => o,
            None => {
                // No checkpoint: only a directory without archive files is
                // fresh. Files without a checkpoint mean it was lost, and
                // their committed lengths with it: refuse.
                let found = walk(&dir)
                    .map_err(io(&dir))?
                    .into_iter()
                    .find(|rel| opts.layout.classify(rel).is_some());
                if let Some(rel) = found {
                    return Err(CheckpointError::Corrupt(
                        dir.join(checkpoint::FILE).display().to_string(),
                        format!("missing, but {rel} exists"),
                    )
                    .into());
                }
                // Written before any archive file exists, so a crash
                // before the first commit still finds a checkpoint.
                let none = Value::Null;
                let w = store
                    .commit(&CheckpointOut::empty(&none))
                    .map_err(io(&dir))?;
                Opened {
                    cp: Default::default(),
                    version: checkpoint::VERSION,
                    main_bytes: w.main_bytes,
                    unreadable: Vec::new(),
                }
            }
        };
        // Only now that the checkpoint is known to be usable: a checkpoint
        // refused above keeps every hour file for whoever restores it.
        let removed = store.remove_unnamed().map_err(io(&dir))?;
        if removed > 0 {
            tracing::info!(removed, dir = %dir.display(),
                "archive: removed checkpoint hour files no checkpoint names (a commit cut short before its checkpoint's rename, or generations it replaced)");
        }
        metrics.checkpoint_bytes.store(store.total_bytes(), Relaxed);
        check_read_bounds(&opts, &store, &opened, &metrics);
        let mut view = AnalyticsView::offline(&dir, opts.layout.clone(), opts.analytics.top_n);
        view.committed = Some(Default::default());
        let mut w = Writer {
            opts,
            files: HashMap::new(),
            hours: HashMap::new(),
            dirty_hours: BTreeSet::new(),
            dirs_to_sync: BTreeSet::new(),
            unparsed_sealed_through: opened.cp.unparsed_sealed_through,
            store,
            open: 0,
            tick: 0,
            metrics,
            view,
            broken: false,
            logged_bound: None,
            logged_far: None,
            far_at_last_log: 0,
        };
        w.recover(&opened)?;
        Ok((w, opened.cp.progress))
    }

    /// Brings the files back to the checkpoint.
    fn recover(&mut self, opened: &Opened) -> Result<(), ArchiveError> {
        let dir = self.opts.dir.clone();
        let cp = &opened.cp;
        // Entry by entry: one that this build cannot name must not keep the
        // archive (and the files sink with it) down forever. See
        // docs/design.md, "Checkpoint entries that cannot be read". An hour
        // file the main file names but that is missing or damaged is one
        // too: the lengths and the progress are in the main file, so
        // nothing is duplicated or lost; only the hour's counts are, and
        // they are rebuilt from its file below, as for a dropped key.
        let (hours, bad_hours) = checkpoint::hour_entries(cp);
        let unreadable: Vec<String> = opened
            .unreadable
            .iter()
            .map(|u| match &u.file {
                Some(f) => format!("{} ({}): {}", u.key, f.display(), u.reason),
                None => format!("{}: {}", u.key, u.reason),
            })
            .collect();
        let bad_files: Vec<(String, u64)> = cp
            .files
            .iter()
            .filter(|(rel, _)| self.opts.layout.classify(rel).is_none())
            .map(|(rel, &len)| (rel.clone(), len))
            .collect();
        if !bad_hours.is_empty() || !bad_files.is_empty() || !unreadable.is_empty() {
            let main = dir.join(checkpoint::FILE);
            let (copy, first) = checkpoint::quarantine(&dir, &main).map_err(io(&main))?;
            let mut copies = vec![copy.display().to_string()];
            let damaged = opened.unreadable.iter().filter(|u| u.on_disk);
            for f in damaged.filter_map(|u| u.file.as_ref()) {
                let (copy, _) = checkpoint::quarantine(&dir, f).map_err(io(f))?;
                copies.push(copy.display().to_string());
            }
            let n = (bad_hours.len() + bad_files.len() + unreadable.len()) as u64;
            // Counted and logged once per checkpoint: a sink reopening the
            // same one (retrying after another error) finds its copy.
            if first {
                self.metrics
                    .checkpoint_entries_dropped
                    .fetch_add(n, Relaxed);
            }
            tracing::error!(
                again = !first,
                hours = ?bad_hours,
                hour_files = ?unreadable,
                files = ?bad_files,
                copies = ?copies,
                "archive: checkpoint entries this build cannot read: their analytics are dropped \
                 (an open hour's counts are rebuilt from its file); each file outside the layout \
                 is cut back to its committed length and left in place, unmanaged (its lines \
                 stay); a copy of the checkpoint (and of each damaged hour file) is kept"
            );
        }
        for (rel, len) in &bad_files {
            // The committed length is known without naming the hour: cut
            // the uncommitted tail (the source sends it again), keep the
            // rest. The next checkpoint no longer names the file. A file
            // gone or shorter is the operator's now: logged, never fatal
            // (a failed fsync still is).
            match self.truncate(&dir.join(rel), *len) {
                Err(e) if !e.is_sticky() => {
                    tracing::warn!(file = %rel, error = %e, "archive: an unreadable checkpoint entry's file left as found");
                }
                r => r?,
            }
        }
        for (h, stats) in hours {
            self.hours.insert(h, stats);
            self.dirty_hours.insert(h);
        }
        for rel in walk(&dir).map_err(io(&dir))? {
            let path = dir.join(&rel);
            if rel.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            let Some((kind, h)) = self.opts.layout.classify(&rel) else {
                continue;
            };
            let keep = match kind {
                Kind::Summary => continue,
                // Both forms: a compression (or decompression) was cut
                // short. The plain file is complete in either case (each
                // form appears only by rename after its fsync): keep it.
                Kind::Compressed => {
                    if dir.join(self.opts.layout.log(h)).exists() {
                        std::fs::remove_file(&path).map_err(io(&path))?;
                        if let Some(p) = path.parent() {
                            self.dirs_to_sync.insert(p.to_path_buf());
                        }
                    }
                    continue;
                }
                _ if cp.files.contains_key(&rel) => continue, // below
                Kind::Log => read_summary(&dir, &self.opts.layout, h)
                    .map_err(ArchiveError::Inconsistent)?
                    .map(|s| s.stats.bytes),
                Kind::Unparsed => (Some(h.0) <= cp.unparsed_sealed_through)
                    .then(|| std::fs::metadata(&path).map_or(0, |m| m.len())),
            };
            match keep {
                Some(len) => self.truncate(&path, len)?,
                None => {
                    // Created after the last commit: nothing in it counts.
                    tracing::warn!(file = %path.display(), "archive: removing a file created after the last checkpoint");
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    self.metrics.recovered_files.fetch_add(1, Relaxed);
                    if let Some(p) = path.parent() {
                        self.dirs_to_sync.insert(p.to_path_buf());
                    }
                }
            }
        }
        for (rel, &len) in &cp.files {
            let path = dir.join(rel);
            let Some((kind, hour)) = self.opts.layout.classify(rel) else {
                continue; // cut back above, left unmanaged
            };
            self.truncate(&path, len)?;
            if kind == Kind::Log && !self.hours.contains_key(&hour) {
                // Its counts were dropped with an unreadable entry: the file
                // holds exactly the committed lines, so count them again.
                let stats = self.rebuild_stats(&path, len)?;
                tracing::warn!(hour = %hour.key(), lines = stats.total,
                    "archive: rebuilt an open hour's counts from its file");
                self.metrics.hours_rebuilt.fetch_add(1, Relaxed);
                self.hours.insert(hour, stats);
                self.dirty_hours.insert(hour);
            }
            self.files.insert(
                PathBuf::from(rel),
                OpenFile {
                    kind,
                    hour,
                    handle: None,
                    buf: Vec::new(),
                    written: len,
                    unsynced: false,
                    last_write: Instant::now(),
                    tick: 0,
                },
            );
        }
        for d in std::mem::take(&mut self.dirs_to_sync) {
            crate::storage::durable::sync_dir(&d).map_err(io(&d))?;
        }
        // Summaries of open hours may be ahead of the checkpoint (written
        // after it, from lines that were then truncated) or behind it.
        for h in self.hours.keys().copied().collect::<Vec<_>>() {
            self.write_summary(h)?;
        }
        self.dirty_hours.clear();
        self.publish();
        Ok(())
    }

    /// An hour's counts from the first `len` bytes of its file (lines
    /// read one at a time, so memory stays bounded by the longest line).
    fn rebuild_stats(&self, path: &Path, len: u64) -> Result<HourStats, ArchiveError> {
        use std::io::{BufRead, Read};
        let mut stats = HourStats::default();
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(stats),
            Err(e) => return Err(io(path)(e)),
        };
        let mut r = std::io::BufReader::new(f.take(len));
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line).map_err(io(path))?;
            if n == 0 {
                break;
            }
            let event = serde_json::from_slice::<Value>(&line).ok();
            let ts = event
                .as_ref()
                .and_then(|e| event_time(e, &self.opts.timestamp_field));
            if let (Some(e), Some(ts)) = (event, ts) {
                stats.add(&self.opts.analytics, &e, ts, n as u64);
            } else {
                // Not ours to judge: keep the bytes counted.
                stats.bytes += n as u64;
            }
        }
        Ok(stats)
    }

    /// Cuts `path` back to `len` bytes, durably. A file shorter than its
    /// committed length lost committed lines: refuse.
    fn truncate(&self, path: &Path, len: u64) -> Result<(), ArchiveError> {
        let f = match OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && len == 0 => return Ok(()),
            Err(e) => return Err(io(path)(e)),
        };
        let actual = f.metadata().map_err(io(path))?.len();
        if actual < len {
            return Err(ArchiveError::Inconsistent(format!(
                "{} has {actual} bytes but {len} were committed: committed lines are missing",
                path.display()
            )));
        }
        if actual > len {
            tracing::warn!(file = %path.display(), committed = len, found = actual,
                "archive: truncating lines written after the last checkpoint");
            f.set_len(len).map_err(io(path))?;
            sync_data(&f, path)?;
            self.metrics.recovered_files.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    pub fn metrics(&self) -> Arc<WriterMetrics> {
        self.metrics.clone()
    }

    pub fn analytics(&self) -> AnalyticsView {
        self.view.clone()
    }

    pub fn options(&self) -> &WriterOptions {
        &self.opts
    }

    /// Appends one record. `position` says where it came from (for Kafka
    /// `{"topic","partition","offset"}`); it is written with unparsed
    /// records only. Nothing is durable until [`Writer::commit`].
    pub fn append(&mut self, value: &[u8], position: &Value) -> Result<Placed, ArchiveError> {
        if self.broken {
            return Err(ArchiveError::Inconsistent(
                "an earlier write failed; reopen the archive".into(),
            ));
        }
        let parsed = serde_json::from_slice::<Value>(value);
        let (event, ts) = match parsed {
            Err(e) => return self.unparsed(value, position, format!("not JSON: {e}")),
            Ok(v) => match event_time(&v, &self.opts.timestamp_field) {
                Some(ts) => (v, ts),
                None => {
                    let reason = format!(
                        "no usable {:?} (RFC 3339 or epoch s/ms, years 0000-9999 in UTC)",
                        self.opts.timestamp_field
                    );
                    return self.unparsed(value, position, reason);
                }
            },
        };
        let hour = Hour::of_millis(ts);
        let trimmed = value.trim_ascii();
        let mut line = if trimmed.contains(&b'\n') || trimmed.contains(&b'\r') || !event.is_object()
        {
            serde_json::to_vec(&event).map_err(|e| ArchiveError::Inconsistent(e.to_string()))?
        } else {
            trimmed.to_vec()
        };
        line.push(b'\n');
        let rel = self.opts.layout.log(hour);
        self.activate(hour, &rel)?;
        let stats = self.hours.entry(hour).or_default();
        let cut = stats.add(&self.opts.analytics, &event, ts, line.len() as u64);
        if cut > 0 {
            self.metrics.values_cut.fetch_add(cut, Relaxed);
        }
        let now = Hour::now().0;
        if hour.0 < now - FAR_PAST_HOURS {
            self.metrics.events_far_past.fetch_add(1, Relaxed);
        } else if hour.0 > now + FAR_FUTURE_HOURS {
            self.metrics.events_far_future.fetch_add(1, Relaxed);
        }
        self.dirty_hours.insert(hour);
        self.push(&rel, Kind::Log, hour, &line)?;
        Ok(Placed::Hour(hour))
    }

    fn unparsed(
        &mut self,
        value: &[u8],
        position: &Value,
        reason: String,
    ) -> Result<Placed, ArchiveError> {
        let now = Hour::now();
        let hour = match self.unparsed_sealed_through {
            Some(s) if now.0 <= s => Hour(s + 1),
            _ => now,
        };
        let mut line = serde_json::to_vec(&serde_json::json!({
            "position": position,
            "reason": reason,
            "value": String::from_utf8_lossy(value),
        }))
        .map_err(|e| ArchiveError::Inconsistent(e.to_string()))?;
        line.push(b'\n');
        let rel = self.opts.layout.unparsed(hour);
        self.push(&rel, Kind::Unparsed, hour, &line)?;
        self.metrics.unparsed.fetch_add(1, Relaxed);
        Ok(Placed::Unparsed(reason))
    }

    /// Makes hour `h` an open hour: a sealed hour (a late event) gets its
    /// counts back from its summary and its file's length from there too.
    fn activate(&mut self, h: Hour, rel: &Path) -> Result<(), ArchiveError> {
        if self.files.contains_key(rel) {
            return Ok(());
        }
        let (mut stats, mut len) = match read_summary(&self.opts.dir, &self.opts.layout, h)
            .map_err(ArchiveError::Inconsistent)?
        {
            Some(s) => {
                let len = s.stats.bytes;
                (s.stats, len)
            }
            None => (HourStats::default(), 0),
        };
        let plain = self.opts.dir.join(rel);
        let zst = zst_path(&plain);
        if len > 0 && !plain.exists() && !zst.exists() {
            // Retention (or an operator) removed the hour's file: a late
            // event starts a new one. The counts keep the removed lines,
            // as retention promises; `bytes` is the new file's length.
            tracing::warn!(hour = %h.key(), "archive: late event for an hour whose file was removed; starting a new file");
            stats.bytes = 0;
            len = 0;
        }
        if !plain.exists() && zst.exists() {
            // A late event for a compressed hour: back to plain first.
            // Streamed: a large hour never sits in memory whole (a 394 MB
            // hour once took RSS from 40 to 532 MiB here).
            let src = std::fs::File::open(&zst).map_err(io(&zst))?;
            crate::storage::durable::write_file_durable_with(&plain, |out| {
                let mut dec = zstd::stream::Decoder::new(src)?;
                std::io::copy(&mut dec, out).map(|_| ())
            })
            .map_err(io(&plain))?;
            std::fs::remove_file(&zst).map_err(io(&zst))?;
            if let Some(p) = plain.parent() {
                crate::storage::durable::sync_dir(p).map_err(io(p))?;
            }
            self.metrics.fsyncs.fetch_add(3, Relaxed);
        }
        self.hours.insert(h, stats);
        self.files.insert(
            rel.to_path_buf(),
            OpenFile {
                kind: Kind::Log,
                hour: h,
                handle: None,
                buf: Vec::new(),
                written: len,
                unsynced: false,
                last_write: Instant::now(),
                tick: 0,
            },
        );
        Ok(())
    }

    fn push(
        &mut self,
        rel: &Path,
        kind: Kind,
        hour: Hour,
        line: &[u8],
    ) -> Result<(), ArchiveError> {
        self.tick += 1;
        let tick = self.tick;
        let f = self
            .files
            .entry(rel.to_path_buf())
            .or_insert_with(|| OpenFile {
                kind,
                hour,
                handle: None,
                buf: Vec::new(),
                written: 0,
                unsynced: false,
                last_write: Instant::now(),
                tick,
            });
        f.buf.extend_from_slice(line);
        f.tick = tick;
        f.last_write = Instant::now();
        self.metrics.lines.fetch_add(1, Relaxed);
        self.metrics.bytes.fetch_add(line.len() as u64, Relaxed);
        if f.buf.len() >= self.opts.buffer_bytes {
            let r = self.flush(rel);
            return self.guard(r);
        }
        Ok(())
    }

    /// After an I/O error the files' state is unknown: refuse further use.
    fn guard<T>(&mut self, r: Result<T, ArchiveError>) -> Result<T, ArchiveError> {
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Writes `rel`'s buffer to the OS, opening the file if needed.
    fn flush(&mut self, rel: &Path) -> Result<(), ArchiveError> {
        let needs_open = self
            .files
            .get(rel)
            .is_some_and(|f| f.handle.is_none() && !f.buf.is_empty());
        if needs_open {
            while self.open >= self.opts.max_open_files.max(1) {
                self.evict()?;
            }
            let path = self.opts.dir.join(rel);
            let expected = self.files.get(rel).map_or(0, |f| f.written);
            let handle = self.open_file(&path, expected)?;
            if let Some(f) = self.files.get_mut(rel) {
                f.handle = Some(handle);
            }
            self.open += 1;
            self.metrics.files_open.store(self.open as u64, Relaxed);
        }
        let Some(f) = self.files.get_mut(rel) else {
            return Ok(());
        };
        if let (Some(h), false) = (f.handle.as_mut(), f.buf.is_empty()) {
            let path = self.opts.dir.join(rel);
            h.write_all(&f.buf).map_err(io(&path))?;
            f.written += f.buf.len() as u64;
            f.buf.clear();
            f.unsynced = true;
        }
        Ok(())
    }

    /// Opens a file for appending. New directories are durable before the
    /// file is created in them; a new file's entry, and the entries of its
    /// ancestors up to the archive root, are fsynced at the next commit
    /// (before its checkpoint), which also covers a directory an earlier
    /// process created and died before fsyncing.
    fn open_file(&mut self, path: &Path, expected: u64) -> Result<File, ArchiveError> {
        if let Some(parent) = path.parent() {
            crate::storage::durable::create_dir_durable(parent).map_err(io(parent))?;
        }
        let existed = path.exists();
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        if !existed {
            // Dying before the commit's directory fsyncs: the file is not
            // in the checkpoint; the next open removes it if it survived.
            self.sync_ancestors_at_commit(path);
        }
        let len = f.metadata().map_err(io(path))?.len();
        if len != expected {
            return Err(ArchiveError::Inconsistent(format!(
                "{} has {len} bytes, the archive expected {expected}: another process writes it",
                path.display()
            )));
        }
        Ok(f)
    }

    /// Queues the directories from `path`'s parent up to the archive root
    /// for the next commit's fsyncs.
    fn sync_ancestors_at_commit(&mut self, path: &Path) {
        let root = self.opts.dir.clone();
        let mut d = path.parent();
        while let Some(dir) = d {
            self.dirs_to_sync.insert(dir.to_path_buf());
            if dir == root || !dir.starts_with(&root) {
                break;
            }
            d = dir.parent();
        }
    }

    /// Flushes, fdatasyncs and closes the least recently written open file.
    fn evict(&mut self) -> Result<(), ArchiveError> {
        let victim = self
            .files
            .iter()
            .filter(|(_, f)| f.handle.is_some())
            .min_by_key(|(_, f)| f.tick)
            .map(|(p, _)| p.clone());
        let Some(rel) = victim else {
            return Err(ArchiveError::Inconsistent("no file to close".into()));
        };
        self.flush(&rel)?;
        self.close(&rel)
    }

    fn close(&mut self, rel: &Path) -> Result<(), ArchiveError> {
        let path = self.opts.dir.join(rel);
        if let Some(f) = self.files.get_mut(rel) {
            if let Some(h) = f.handle.take() {
                if f.unsynced {
                    sync_data(&h, &path)?;
                    self.metrics.fsyncs.fetch_add(1, Relaxed);
                    f.unsynced = false;
                }
                self.open -= 1;
                self.metrics.files_open.store(self.open as u64, Relaxed);
            }
        }
        Ok(())
    }

    /// Makes everything appended so far durable, with `progress`, in this
    /// order: write every buffer; fdatasync every file written since the
    /// last commit, and the directory of every new file or directory; seal
    /// idle hours (summary written durably first); replace the checkpoint
    /// (lengths, analytics, progress); refresh the open hours' summaries.
    /// If the process dies before the checkpoint's rename, the next open
    /// truncates to the previous checkpoint and returns the previous
    /// progress, so the source resends exactly what was cut off.
    pub fn commit(&mut self, progress: &Value) -> Result<(), ArchiveError> {
        if self.broken {
            return Err(ArchiveError::Inconsistent(
                "an earlier write failed; reopen the archive".into(),
            ));
        }
        let r = self.commit_inner(progress);
        self.guard(r)
    }

    fn commit_inner(&mut self, progress: &Value) -> Result<(), ArchiveError> {
        let started = Instant::now();
        let rels: Vec<PathBuf> = self.files.keys().cloned().collect();
        for rel in &rels {
            self.flush(rel)?;
        }
        for rel in &rels {
            let path = self.opts.dir.join(rel);
            if let Some(f) = self.files.get_mut(rel) {
                if let (Some(h), true) = (f.handle.as_ref(), f.unsynced) {
                    sync_data(h, &path)?;
                    self.metrics.fsyncs.fetch_add(1, Relaxed);
                    f.unsynced = false;
                }
            }
        }
        for d in std::mem::take(&mut self.dirs_to_sync) {
            crate::storage::durable::sync_dir(&d).map_err(io(&d))?;
            self.metrics.fsyncs.fetch_add(1, Relaxed);
        }
        // Everything is durable now. Idle files close and their hours seal;
        // so do the least recently written hours past max_open_hours.
        let mut victims: BTreeSet<PathBuf> = self
            .files
            .iter()
            .filter(|(_, f)| f.last_write.elapsed() >= self.opts.idle_close)
            .map(|(p, _)| p.clone())
            .collect();
        let over = self.over_bound(&victims);
        victims.extend(over.iter().cloned());
        for rel in &victims {
            self.close(rel)?;
        }
        let current_unparsed = Hour::now();
        let mut sealed_unparsed = self.unparsed_sealed_through;
        for rel in &victims {
            if let Some(f) = self.files.get(rel) {
                if f.kind == Kind::Unparsed && f.hour < current_unparsed {
                    sealed_unparsed = sealed_unparsed.max(Some(f.hour.0));
                }
            }
        }
        let sealed: Vec<PathBuf> = victims
            .into_iter()
            .filter(|rel| {
                self.files
                    .get(rel)
                    .is_some_and(|f| f.kind == Kind::Log || Some(f.hour.0) <= sealed_unparsed)
            })
            .collect();
        let sealed_hours: BTreeSet<Hour> = sealed
            .iter()
            .filter_map(|r| self.files.get(r))
            .filter(|f| f.kind == Kind::Log)
            .map(|f| f.hour)
            .collect();
        // The checkpoint names every file and hour, the ones about to seal
        // too: it commits the lines appended since the last one, theirs
        // included, and writes the files of the hours they changed. Dying
        // before its main file's rename: the lines are durable but not
        // committed; the next open truncates them, removes the new hour
        // files, and the source resends the lines.
        let cp = checkpoint_of(
            &self.files,
            &self.hours,
            progress,
            sealed_unparsed,
            &BTreeSet::new(),
            &self.dirty_hours,
        );
        write_checkpoint(&mut self.store, &self.opts, &self.metrics, &cp)?;
        // Committed.
        self.unparsed_sealed_through = sealed_unparsed;
        if !sealed.is_empty() {
            // Seal: each sealed hour's summary (its `bytes` is the length
            // just checkpointed: the file is synced, closed and not written
            // again) made durable, then a second checkpoint that no longer
            // names them. Dying in between: the first checkpoint names them
            // with the same lengths and counts, and wins.
            self.seal_summaries(&sealed_hours)?;
            let sealed_set: BTreeSet<PathBuf> = sealed.iter().cloned().collect();
            // Nothing changed since the first: only the main file is
            // written; the sealed hours' files are unlinked after it.
            let cp = checkpoint_of(
                &self.files,
                &self.hours,
                progress,
                sealed_unparsed,
                &sealed_set,
                &BTreeSet::new(),
            );
            write_checkpoint(&mut self.store, &self.opts, &self.metrics, &cp)?;
            for rel in &sealed {
                let kind = self.files.remove(rel).map(|f| f.kind);
                if self.opts.compress_sealed && kind == Some(Kind::Log) {
                    self.compress(rel)?;
                }
            }
            for h in &sealed_hours {
                self.hours.remove(h);
            }
        }
        self.log_bound(&over);
        // Summaries of open hours follow the checkpoint (a crash before
        // they are written is repaired by the next open).
        let mut changed = std::mem::take(&mut self.dirty_hours);
        for &h in &changed {
            if !sealed_hours.contains(&h) {
                self.write_summary(h)?;
            }
        }
        // The view gets what changed only: cost proportional to the commit.
        changed.extend(sealed_hours.iter().copied());
        self.publish_changed(&changed);
        self.metrics.commits.fetch_add(1, Relaxed);
        self.metrics
            .last_commit_micros
            .store(started.elapsed().as_micros() as u64, Relaxed);
        Ok(())
    }

    /// True when more hours are open than a commit may leave
    /// (2 x `max_open_hours`): the source should commit now, which seals
    /// the least recently written down to `max_open_hours`. Memory, the
    /// checkpoint and the commit's cost stay proportional to that bound.
    pub fn wants_commit(&self) -> bool {
        self.hours.len() > 2 * self.opts.max_open_hours.max(1)
    }

    /// The open hourly files past `max_open_hours` (not counting
    /// `already`, which seal anyway): far-past and far-future hours first,
    /// then the least recently written.
    fn over_bound(&self, already: &BTreeSet<PathBuf>) -> Vec<PathBuf> {
        let now = Hour::now().0;
        let mut open: Vec<(bool, u64, &PathBuf)> = self
            .files
            .iter()
            .filter(|(p, f)| f.kind == Kind::Log && !already.contains(*p))
            .map(|(p, f)| {
                let near = (now - FAR_PAST_HOURS..=now + FAR_FUTURE_HOURS).contains(&f.hour.0);
                (near, f.tick, p)
            })
            .collect();
        let max = self.opts.max_open_hours.max(1);
        if open.len() <= max {
            return Vec::new();
        }
        open.sort();
        let n = open.len() - max;
        open.into_iter()
            .take(n)
            .map(|(_, _, p)| p.clone())
            .collect()
    }

    /// Counts the hours sealed over the bound and logs it (at most once
    /// per [`LOG_EVERY`], with the totals); the same for far times.
    fn log_bound(&mut self, over: &[PathBuf]) {
        let m = &self.metrics;
        if !over.is_empty() {
            let total = m
                .files_sealed_over_bound
                .fetch_add(over.len() as u64, Relaxed)
                + over.len() as u64;
            if self.logged_bound.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                self.logged_bound = Some(Instant::now());
                tracing::warn!(
                    sealed = over.len(),
                    total,
                    max_open_hours = self.opts.max_open_hours,
                    first = %over.first().map(|p| p.display().to_string()).unwrap_or_default(),
                    "archive: more hours open than archive.max-open-hours; sealed the least recently written (a late event reopens its hour from the summary)"
                );
            }
        }
        let far = m.events_far_past.load(Relaxed) + m.events_far_future.load(Relaxed);
        if far > self.far_at_last_log && self.logged_far.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.logged_far = Some(Instant::now());
            self.far_at_last_log = far;
            tracing::warn!(
                far_past = m.events_far_past.load(Relaxed),
                far_future = m.events_far_future.load(Relaxed),
                "archive: events more than 7 days old or 1 hour ahead of the clock (archived in their own hours; those hours are sealed first)"
            );
        }
    }

    /// Replaces a sealed hour's file by `<file>.zst`: the compressed copy
    /// is durable under its name before the plain file goes, so a death
    /// leaves one complete form or both (the next open keeps the plain).
    fn compress(&mut self, rel: &Path) -> Result<(), ArchiveError> {
        let plain = self.opts.dir.join(rel);
        let zst = zst_path(&plain);
        // Streamed through a 1 MiB read buffer and zstd's window, never the
        // whole hour in memory.
        let src = std::fs::File::open(&plain).map_err(io(&plain))?;
        crate::storage::durable::write_file_durable_with(&zst, |out| {
            let mut enc = zstd::stream::Encoder::new(out, 3)?;
            let mut src = std::io::BufReader::with_capacity(1 << 20, src);
            std::io::copy(&mut src, &mut enc)?;
            enc.finish().map(|_| ())
        })
        .map_err(io(&zst))?;
        std::fs::remove_file(&plain).map_err(io(&plain))?;
        if let Some(p) = plain.parent() {
            crate::storage::durable::sync_dir(p).map_err(io(p))?;
        }
        self.metrics.fsyncs.fetch_add(3, Relaxed);
        Ok(())
    }

    /// Hour `h`'s summary: its path and JSON, if the hour is open.
    fn summary_body(&self, h: Hour) -> Result<Option<(PathBuf, Vec<u8>)>, ArchiveError> {
        let Some(stats) = self.hours.get(&h) else {
            return Ok(None);
        };
        let path = self.opts.dir.join(self.opts.layout.summary(h));
        let summary = stats.summary(
            &h.key(),
            &self.opts.layout.log(h).to_string_lossy(),
            self.opts.analytics.top_n,
        );
        let body = serde_json::to_vec_pretty(&summary)
            .map_err(|e| ArchiveError::Inconsistent(e.to_string()))?;
        Ok(Some((path, body)))
    }

    /// Creates a summary's directory durably (its entry in its parent).
    fn summary_dir(&mut self, path: &Path) -> Result<PathBuf, ArchiveError> {
        let parent = path.parent().unwrap_or(&self.opts.dir).to_path_buf();
        if crate::storage::durable::create_dir_durable(&parent).map_err(io(&parent))? {
            self.metrics.fsyncs.fetch_add(2, Relaxed);
        }
        Ok(parent)
    }

    /// Makes the summaries of `hours` durable, the record of each hour once
    /// the checkpoint stops naming it: each written as tmp, fsync, rename;
    /// then every directory they are in and its ancestors up to the root
    /// fsynced once (a directory an earlier process made and died before
    /// fsyncing; one fsync per directory however many hours seal at once).
    /// Dying anywhere in here: the checkpoint still names the hours; the
    /// next open writes their summaries again.
    fn seal_summaries(&mut self, hours: &BTreeSet<Hour>) -> Result<(), ArchiveError> {
        let mut dirs = BTreeSet::new();
        for &h in hours {
            let Some((path, body)) = self.summary_body(h)? else {
                continue;
            };
            let parent = self.summary_dir(&path)?;
            crate::storage::durable::replace_file(&path, &body).map_err(io(&path))?;
            self.metrics.fsyncs.fetch_add(1, Relaxed);
            let mut d = Some(parent.as_path());
            while let Some(up) = d.filter(|u| u.starts_with(&self.opts.dir)) {
                dirs.insert(up.to_path_buf());
                d = up.parent();
            }
        }
        for d in dirs {
            crate::storage::durable::sync_dir(&d).map_err(io(&d))?;
            self.metrics.fsyncs.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Writes an open hour's summary (tmp, rename, no fsync). The
    /// checkpoint holds its counts, this file is a readable copy refreshed
    /// after each commit. Not fsynced (it would cost two fsyncs per open
    /// hour per commit): a power cut may leave it old, empty or absent, and
    /// the next open writes it again from the checkpoint, which names the
    /// hour until it is sealed ([`Writer::seal_summaries`]).
    fn write_summary(&mut self, h: Hour) -> Result<(), ArchiveError> {
        let Some((path, body)) = self.summary_body(h)? else {
            return Ok(());
        };
        self.summary_dir(&path)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        drop(f);
        crate::storage::rename(&tmp, &path).map_err(io(&path))?;
        Ok(())
    }

    /// Hands the committed counts of the `changed` hours to the view
    /// (removing the sealed ones: their summaries answer now).
    fn publish_changed(&self, changed: &BTreeSet<Hour>) {
        if let Some(Ok(mut m)) = self.view.committed.as_ref().map(|m| m.lock()) {
            for h in changed {
                match self.hours.get(h) {
                    Some(s) => {
                        m.insert(*h, s.clone());
                    }
                    None => {
                        m.remove(h);
                    }
                }
            }
        }
    }

    /// Hands the committed counts of the open hours to the view.
    fn publish(&self) {
        if let Some(Ok(mut m)) = self.view.committed.as_ref().map(|m| m.lock()) {
            *m = self.hours.clone();
        }
    }

    /// Retention: deletes the hourly files (plain or compressed) and the
    /// unparsed files of hours before `cutoff`, keeping their summaries.
    /// Hours still open are never touched. Returns the files deleted.
    pub fn remove_hours_before(&mut self, cutoff: Hour) -> Result<usize, ArchiveError> {
        let dir = self.opts.dir.clone();
        let mut removed = 0;
        let mut dirs = BTreeSet::new();
        for rel in walk(&dir).map_err(io(&dir))? {
            let Some((kind, h)) = self.opts.layout.classify(&rel) else {
                continue;
            };
            if kind == Kind::Summary || h >= cutoff || self.files.contains_key(Path::new(&rel)) {
                continue;
            }
            let path = dir.join(&rel);
            std::fs::remove_file(&path).map_err(io(&path))?;
            tracing::info!(file = %path.display(), "archive: retention removed an hourly file");
            removed += 1;
            if let Some(p) = path.parent() {
                dirs.insert(p.to_path_buf());
            }
        }
        for d in dirs {
            crate::storage::durable::sync_dir(&d).map_err(io(&d))?;
        }
        Ok(removed)
    }

    /// Files currently open.
    pub fn open_files(&self) -> usize {
        self.open
    }

    /// Closes every file and seals every hour (for a clean shutdown),
    /// committing `progress`.
    pub fn close_all(&mut self, progress: &Value) -> Result<(), ArchiveError> {
        let idle = self.opts.idle_close;
        self.opts.idle_close = Duration::ZERO;
        let r = self.commit(progress);
        self.opts.idle_close = idle;
        r
    }
}

/// The checkpoint of the current state, without the files in `except`
/// (and their hours); it borrows the counts. `changed`: the hours whose
/// counts changed since the last checkpoint (their files are written).
fn checkpoint_of<'a>(
    files: &'a HashMap<PathBuf, OpenFile>,
    hours: &'a HashMap<Hour, HourStats>,
    progress: &'a Value,
    unparsed_sealed_through: Option<i64>,
    except: &BTreeSet<PathBuf>,
    changed: &BTreeSet<Hour>,
) -> CheckpointOut<'a> {
    let mut cp = CheckpointOut {
        files: Default::default(),
        hours: Default::default(),
        progress,
        unparsed_sealed_through,
    };
    let mut gone = BTreeSet::new();
    for (rel, f) in files {
        if except.contains(rel) {
            if f.kind == Kind::Log {
                gone.insert(f.hour);
            }
        } else {
            cp.files
                .insert(rel.to_string_lossy().into_owned(), f.written);
        }
    }
    for (h, s) in hours {
        if !gone.contains(h) {
            cp.hours.insert(h.key(), (s, changed.contains(h)));
        }
    }
    cp
}

/// Makes `cp` the durable checkpoint, counting its fsyncs and sizes against
/// the bounds.
fn write_checkpoint(
    store: &mut Store,
    opts: &WriterOptions,
    metrics: &WriterMetrics,
    cp: &CheckpointOut,
) -> Result<(), ArchiveError> {
    let w = store.commit(cp).map_err(io(&opts.dir))?;
    metrics.fsyncs.fetch_add(w.fsyncs, Relaxed);
    metrics.checkpoint_bytes.store(w.total_bytes, Relaxed);
    metrics
        .checkpoint_written_bytes
        .store(w.main_bytes + w.hour_bytes, Relaxed);
    let b = opts.checkpoint_bounds();
    if w.main_bytes > b.main || w.largest_hour > b.hour {
        // Not refused (the lines are durable, the checkpoint is valid):
        // a bound computed wrong, which the tests would show.
        metrics.checkpoint_over_bound.fetch_add(1, Relaxed);
        tracing::error!(
            main_bytes = w.main_bytes,
            largest_hour_bytes = w.largest_hour,
            main_bound = b.main,
            hour_bound = b.hour,
            "archive: wrote a checkpoint file larger than its computed bound"
        );
    }
    Ok(())
}

/// Counts and logs checkpoint files read at open that are larger than
/// these options write. Valid (their checksums matched), only bigger: an
/// older build without the value cap or the open-hour bound, or larger
/// settings. Read anyway, values cut as they came in; the first commit
/// seals the hours past the bound and rewrites the rest.
fn check_read_bounds(opts: &WriterOptions, store: &Store, opened: &Opened, m: &WriterMetrics) {
    let b = opts.checkpoint_bounds();
    let main_bound = if opened.version == 1 { b.whole } else { b.main };
    let hours_over = store.named().values().filter(|r| r.bytes > b.hour).count() as u64;
    let over = u64::from(opened.main_bytes > main_bound) + hours_over;
    if over > 0 {
        m.checkpoint_over_bound.fetch_add(over, Relaxed);
        tracing::warn!(main_bytes = opened.main_bytes, main_bound, hour_files_over = hours_over,
            hour_bound = b.hour, format = opened.version, dir = %opts.dir.display(),
            "archive: checkpoint files larger than these settings write (an older build, or larger archive.max-open-hours / max-tracked); read in full, tracked values cut to 256 bytes, hours past the bound sealed at the next commit");
    }
}

fn zst_path(plain: &Path) -> PathBuf {
    let mut s = plain.as_os_str().to_owned();
    s.push(".zst");
    PathBuf::from(s)
}

/// The event time in milliseconds: an RFC 3339 string, or a number of
/// epoch seconds (below 10^11) or milliseconds. `None` when absent,
/// unparseable, or outside [`MIN_EVENT_MS`]..=[`MAX_EVENT_MS`] once in UTC
/// (`9999-12-31T23:30:00-01:00` is year 10000 in UTC): such a record goes
/// to the unparsed file.
pub fn event_time(event: &Value, field: &str) -> Option<i64> {
    let ms = match event.get(field)? {
        Value::String(s) => {
            let t = chrono::DateTime::parse_from_rfc3339(s.trim()).ok()?;
            // A leap second (`23:59:60Z`) is chrono's second 59 with more
            // than a second of fraction; its millisecond count would fall in
            // the next day's hour 00. It belongs to the last millisecond of
            // its own minute.
            t.timestamp() * 1000 + i64::from(t.timestamp_subsec_millis().min(999))
        }
        Value::Number(n) => {
            let f = n.as_f64()?;
            if !f.is_finite() {
                return None;
            }
            let ms = if f.abs() < 1e11 { f * 1000.0 } else { f };
            if !(MIN_EVENT_MS as f64..=MAX_EVENT_MS as f64).contains(&ms) {
                return None;
            }
            ms as i64
        }
        _ => return None,
    };
    (MIN_EVENT_MS..=MAX_EVENT_MS).contains(&ms).then_some(ms)
}

/// Every regular file under `dir`, relative, `/`-separated (the
/// checkpoint's own files excluded: the top-level files and
/// `checkpoint.d/`).
fn walk(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let name = rel.join(entry.file_name());
            let ty = entry.file_type()?;
            if ty.is_dir() && name.as_os_str() == checkpoint::HOURS_DIR {
                continue;
            } else if ty.is_dir() {
                stack.push(name);
            } else if ty.is_file() && rel.as_os_str().is_empty() {
                // Top-level files are the checkpoint's and the operator's.
                continue;
            } else if ty.is_file() {
                out.push(name.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(ts: &str, path: &str) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"tenant_id": "acme", "source": "web", "severity": "INFO",
                                   "timestamp": ts, "path": path}),
        )
        .unwrap()
    }

    fn opts(dir: &Path) -> WriterOptions {
        WriterOptions::new(dir)
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn pos(n: u64) -> Value {
        json!({"partition": 0, "offset": n})
    }

    #[test]
    fn events_go_to_their_own_hour_including_late_ones_and_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, p) = Writer::open(opts(d.path())).unwrap();
        assert_eq!(p, Value::Null);
        w.append(&ev("2026-11-26T12:59:59.999Z", "/a"), &pos(0))
            .unwrap();
        w.append(&ev("2026-11-26T13:00:00Z", "/b"), &pos(1))
            .unwrap();
        // Late, and in another zone: 11:30 UTC.
        w.append(&ev("2026-11-26T12:30:00+01:00", "/a"), &pos(2))
            .unwrap();
        w.append(&ev("2026-11-26T14:00:00+01:00", "/c"), &pos(3))
            .unwrap();
        w.commit(&json!({"next": 4})).unwrap();
        let logs = d.path().join("logs/2026-11-26");
        assert_eq!(lines(&logs.join("12.log.json")).len(), 1);
        assert_eq!(lines(&logs.join("11.log.json")).len(), 1);
        assert_eq!(lines(&logs.join("13.log.json")).len(), 2);
        assert_eq!(lines(&logs.join("13.log.json"))[0]["path"], "/b");
        let view = w.analytics();
        let h12 = view
            .hour(Hour::parse("2026-11-26T12").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(h12.total, 1);
        assert_eq!(h12.fields["path"].counts["/a"], 1);
        let s: Summary = serde_json::from_slice(
            &std::fs::read(d.path().join("analytics/2026-11-26/summary_12.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(s.stats.total, 1);
        assert_eq!(s.first_event.as_deref(), Some("2026-11-26T12:59:59.999Z"));
        assert_eq!(
            s.stats.bytes,
            std::fs::metadata(logs.join("12.log.json")).unwrap().len()
        );
        let range = view
            .range(
                Hour::parse("2026-11-26T11").unwrap(),
                Hour::parse("2026-11-26T13").unwrap(),
            )
            .unwrap();
        assert_eq!(range.stats.total, 4);
    }

    #[test]
    fn open_truncates_to_the_checkpoint_and_returns_its_progress() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("logs/2026-11-26/12.log.json");
        {
            let (mut w, _) = Writer::open(opts(d.path())).unwrap();
            w.append(&ev("2026-11-26T12:00:00Z", "/a"), &pos(0))
                .unwrap();
            w.commit(&json!({"next": 1})).unwrap();
            w.append(&ev("2026-11-26T12:01:00Z", "/b"), &pos(1))
                .unwrap();
            // A new hour's file, never committed.
            w.append(&ev("2026-11-26T15:00:00Z", "/x"), &pos(2))
                .unwrap();
            // Written to the OS, as if the process died right before the
            // checkpoint: the tail must go.
            for rel in w.files.keys().cloned().collect::<Vec<_>>() {
                w.flush(&rel).unwrap();
            }
            assert_eq!(lines(&file).len(), 2);
        }
        // A summary written after the lost tail would be ahead, too.
        let (w, progress) = Writer::open(opts(d.path())).unwrap();
        assert_eq!(progress, json!({"next": 1}));
        assert_eq!(lines(&file).len(), 1);
        assert!(!d.path().join("logs/2026-11-26/15.log.json").exists());
        let h = Hour::parse("2026-11-26T12").unwrap();
        assert_eq!(w.analytics().hour(h).unwrap().unwrap().total, 1);
        assert_eq!(w.metrics().recovered_files.load(Relaxed), 2);
    }

    #[test]
    fn unparsed_records_keep_their_position_and_are_counted() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = Writer::open(opts(d.path())).unwrap();
        // Unparsed lines go by arrival hour (the wall clock): a run that
        // crosses an hour (started at 18:59:59.9) splits them in two files.
        let arrived = Hour::now();
        let bad: [&[u8]; 4] = [
            b"not json",
            br#"{"no":"time"}"#,
            br#"{"timestamp":"yesterday"}"#,
            b"\xff\xfe",
        ];
        for (i, b) in bad.iter().enumerate() {
            let placed = w.append(b, &pos(i as u64)).unwrap();
            assert!(matches!(placed, Placed::Unparsed(_)), "{placed:?}");
        }
        w.append(&ev("2026-11-26T12:00:00Z", "/a"), &pos(9))
            .unwrap();
        w.commit(&json!({})).unwrap();
        assert_eq!(w.metrics().unparsed.load(Relaxed), 4);
        let hours = arrived.0..=Hour::now().0;
        let got = unparsed_lines(d.path(), &w.options().layout, hours.clone());
        assert_eq!(got.len(), 4);
        assert_eq!(got[1]["position"], pos(1));
        assert_eq!(got[0]["value"], "not json");
        assert!(got[2]["reason"].as_str().unwrap().contains("timestamp"));
        drop(w);
        let (w, _) = Writer::open(opts(d.path())).unwrap();
        assert_eq!(
            unparsed_lines(d.path(), &w.options().layout, hours).len(),
            4
        );
    }

    /// The lines of the unparsed files of `hours`, oldest hour first.
    fn unparsed_lines(
        dir: &Path,
        layout: &Layout,
        hours: std::ops::RangeInclusive<i64>,
    ) -> Vec<Value> {
        hours
            .flat_map(|h| lines(&dir.join(layout.unparsed(Hour(h)))))
            .collect()
    }

    #[test]
    fn files_stay_open_within_a_bound_and_sealed_hours_reopen_for_late_events() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        o.max_open_files = 2;
        let (mut w, _) = Writer::open(o.clone()).unwrap();
        for round in 0..3 {
            for h in 0..5 {
                let ts = format!("2026-11-26T{h:02}:00:0{round}Z");
                w.append(&ev(&ts, "/p"), &pos(0)).unwrap();
            }
            w.commit(&json!({"round": round})).unwrap();
            assert!(w.open_files() <= 2);
        }
        // Seal everything, as an idle archive does.
        w.close_all(&json!({"round": 3})).unwrap();
        assert_eq!(w.open_files(), 0);
        let cp = checkpoint::read(d.path()).unwrap().unwrap();
        assert!(cp.files.is_empty() && cp.hours.is_empty(), "{cp:?}");
        // A late event for a sealed hour continues its counts.
        w.append(&ev("2026-11-26T03:30:00Z", "/late"), &pos(0))
            .unwrap();
        w.commit(&json!({"round": 4})).unwrap();
        drop(w);
        let (w, _) = Writer::open(o).unwrap();
        for h in 0..5 {
            let hour = Hour::parse(&format!("2026-11-26T{h:02}")).unwrap();
            let n = lines(&d.path().join(w.options().layout.log(hour))).len() as u64;
            let s = w.analytics().hour(hour).unwrap().unwrap();
            assert_eq!(s.total, n, "hour {h}");
            assert_eq!(n, if h == 3 { 4 } else { 3 });
        }
    }

    #[test]
    fn retention_removes_old_files_and_keeps_their_analytics() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        o.idle_close = Duration::ZERO;
        let (mut w, _) = Writer::open(o).unwrap();
        w.append(&ev("2026-11-20T08:00:00Z", "/old"), &pos(0))
            .unwrap();
        w.append(&ev("2026-11-26T12:00:00Z", "/new"), &pos(1))
            .unwrap();
        w.commit(&json!({})).unwrap();
        let removed = w
            .remove_hours_before(Hour::parse("2026-11-25T00").unwrap())
            .unwrap();
        assert_eq!(removed, 1);
        assert!(!d.path().join("logs/2026-11-20/08.log.json").exists());
        assert!(d.path().join("logs/2026-11-26/12.log.json").exists());
        let old = Hour::parse("2026-11-20T08").unwrap();
        assert_eq!(w.analytics().hour(old).unwrap().unwrap().total, 1);
        // A late event for the removed hour starts a new file; the counts
        // keep the removed line, the length is the new file's.
        w.append(&ev("2026-11-20T08:30:00Z", "/later"), &pos(2))
            .unwrap();
        w.commit(&json!({})).unwrap();
        drop(w);
        let (w, _) = Writer::open(opts(d.path())).unwrap();
        let file = d.path().join("logs/2026-11-20/08.log.json");
        assert_eq!(lines(&file).len(), 1);
        let s = w.analytics().hour(old).unwrap().unwrap();
        assert_eq!(
            (s.total, s.bytes),
            (2, std::fs::metadata(&file).unwrap().len())
        );
    }

    #[test]
    fn sealed_hours_compress_and_a_late_event_decompresses_first() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        o.idle_close = Duration::ZERO;
        o.compress_sealed = true;
        let (mut w, _) = Writer::open(o.clone()).unwrap();
        w.append(&ev("2026-11-26T12:00:00Z", "/a"), &pos(0))
            .unwrap();
        w.append(&ev("2026-11-26T12:10:00Z", "/b"), &pos(1))
            .unwrap();
        w.commit(&json!({})).unwrap();
        let plain = d.path().join("logs/2026-11-26/12.log.json");
        let zst = d.path().join("logs/2026-11-26/12.log.json.zst");
        assert!(!plain.exists() && zst.exists());
        let text = zstd::stream::decode_all(&std::fs::read(&zst).unwrap()[..]).unwrap();
        assert_eq!(
            text.split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            2
        );
        // Reopening keeps the compressed file (it is not the layout's plain file).
        drop(w);
        let (mut w, _) = Writer::open(o.clone()).unwrap();
        assert!(zst.exists());
        // A late event: decompressed, appended, counted, compressed again.
        o.compress_sealed = false;
        w.opts.compress_sealed = false;
        w.append(&ev("2026-11-26T12:20:00Z", "/c"), &pos(2))
            .unwrap();
        w.commit(&json!({})).unwrap();
        assert!(!zst.exists());
        assert_eq!(lines(&plain).len(), 3);
        let h = Hour::parse("2026-11-26T12").unwrap();
        assert_eq!(w.analytics().hour(h).unwrap().unwrap().total, 3);
        // Both forms after a cut-short compression: the plain one stays.
        std::fs::write(&zst, b"partial").unwrap();
        drop(w);
        let (_w, _) = Writer::open(o).unwrap();
        assert!(!zst.exists());
        assert_eq!(lines(&plain).len(), 3);
    }

    #[test]
    fn a_lost_or_damaged_checkpoint_refuses_to_start() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut w, _) = Writer::open(opts(d.path())).unwrap();
            w.append(&ev("2026-11-26T12:00:00Z", "/a"), &pos(0))
                .unwrap();
            w.commit(&json!({})).unwrap();
        }
        std::fs::remove_file(d.path().join(checkpoint::FILE)).unwrap();
        let err = Writer::open(opts(d.path())).err().unwrap().to_string();
        assert!(err.contains("refusing to start"), "{err}");
        // Fresh directories with unrelated files are fine.
        let e = tempfile::tempdir().unwrap();
        std::fs::write(e.path().join("README"), "x").unwrap();
        Writer::open(opts(e.path())).unwrap();
    }

    #[test]
    fn entries_an_open_cannot_name_are_dropped_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut w, _) = Writer::open(opts(d.path())).unwrap();
            w.append(&ev("2026-11-26T12:00:00Z", "/a"), &pos(0))
                .unwrap();
            w.commit(&json!({"next": 1})).unwrap();
        }
        let mut cp = checkpoint::read(d.path()).unwrap().unwrap();
        // An older build's year-10000 hour, its file gone; and a key no
        // build writes for an hour whose file is on disk.
        cp.hours
            .insert("+10000-01-01T00".into(), HourStats::default());
        cp.files.insert("logs/+10000-01-01/00.log.json".into(), 10);
        let h12 = cp.hours.remove("2026-11-26T12").unwrap();
        cp.hours.insert("2026-11-26 12h".into(), h12);
        checkpoint::write_v1(d.path(), &cp).unwrap();
        let (w, progress) = Writer::open(opts(d.path())).unwrap();
        assert_eq!(progress, json!({"next": 1}));
        let m = w.metrics();
        assert_eq!(m.checkpoint_entries_dropped.load(Relaxed), 3);
        assert_eq!(m.hours_rebuilt.load(Relaxed), 1);
        let h = Hour::parse("2026-11-26T12").unwrap();
        assert_eq!(w.analytics().hour(h).unwrap().unwrap().total, 1);
        let copies = || {
            std::fs::read_dir(d.path())
                .unwrap()
                .filter(|e| {
                    let n = e.as_ref().unwrap().file_name();
                    n.to_string_lossy().starts_with("checkpoint.unreadable-")
                })
                .count()
        };
        assert_eq!(copies(), 1);
        // Opened again before any commit (a sink retrying): the same copy,
        // nothing counted twice.
        drop(w);
        let (w, _) = Writer::open(opts(d.path())).unwrap();
        assert_eq!(w.metrics().checkpoint_entries_dropped.load(Relaxed), 0);
        assert_eq!(copies(), 1);
    }

    #[test]
    fn open_hours_past_the_bound_seal_far_times_first_then_the_least_recent() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        o.max_open_hours = 2;
        let (mut w, _) = Writer::open(o.clone()).unwrap();
        // Fixed once: only the far hours (a year away) depend on the clock.
        let now = Hour::now().0;
        let at = |h: i64| {
            let ms = (now + h) * 3_600_000;
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .to_rfc3339()
        };
        // Written in this order: now-1, now, a year ago, a year ahead.
        for (i, h) in [-1, 0, -24 * 365, 24 * 365].into_iter().enumerate() {
            w.append(&ev(&at(h), "/p"), &pos(i as u64)).unwrap();
            assert!(!w.wants_commit());
        }
        w.commit(&json!({"n": 4})).unwrap();
        let cp = checkpoint::read(d.path()).unwrap().unwrap();
        let near: Vec<String> = [-1, 0].iter().map(|&h| Hour(now + h).key()).collect();
        assert_eq!(cp.hours.keys().cloned().collect::<Vec<_>>(), near);
        let m = w.metrics();
        assert_eq!(m.files_sealed_over_bound.load(Relaxed), 2);
        assert_eq!(m.events_far_past.load(Relaxed), 1);
        assert_eq!(m.events_far_future.load(Relaxed), 1);
        // The far hours' summaries are their record now.
        let far = Hour(now + 24 * 365);
        assert_eq!(w.analytics().hour(far).unwrap().unwrap().total, 1);
        // Five more near hours: past twice the bound the source is asked
        // to commit; the commit leaves the two most recent open.
        for h in 1..=5 {
            w.append(&ev(&at(-1 - h), "/q"), &pos(10 + h as u64))
                .unwrap();
        }
        assert!(w.wants_commit());
        w.commit(&json!({"n": 9})).unwrap();
        assert!(!w.wants_commit());
        let cp = checkpoint::read(d.path()).unwrap().unwrap();
        let last: Vec<String> = [-6, -5].iter().map(|&h| Hour(now + h).key()).collect();
        assert_eq!(cp.hours.keys().cloned().collect::<Vec<_>>(), last);
        assert!(cp.files.len() <= 3, "{:?}", cp.files);
        drop(w);
        let (w, p) = Writer::open(o).unwrap();
        assert_eq!(p, json!({"n": 9}));
        for h in [-6, -5, -4, -3, -2, -1, 0, 24 * 365, -24 * 365] {
            let s = w.analytics().hour(Hour(now + h)).unwrap();
            assert_eq!(s.map(|s| s.total), Some(1), "hour {h}");
        }
    }

    #[test]
    fn event_times_in_seconds_millis_and_strings() {
        assert_eq!(
            event_time(&json!({"t": 1_700_000_000}), "t"),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            event_time(&json!({"t": 1_700_000_000_123_i64}), "t"),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            event_time(&json!({"t": "1970-01-01T00:00:01Z"}), "t"),
            Some(1000)
        );
        assert_eq!(event_time(&json!({"t": 1e300}), "t"), None);
        // In range in their own zone, outside years 0000-9999 in UTC.
        assert_eq!(
            event_time(&json!({"t": "9999-12-31T23:30:00-01:00"}), "t"),
            None
        );
        assert_eq!(
            event_time(&json!({"t": "0000-01-01T00:30:00+01:00"}), "t"),
            None
        );
        assert_eq!(
            event_time(&json!({"t": "9999-12-31T23:59:59.999Z"}), "t"),
            Some(MAX_EVENT_MS)
        );
        assert_eq!(event_time(&json!({"t": null}), "t"), None);
    }

    /// A leap second stays in its own day and hour (it was archived in the
    /// next day's hour 00).
    #[test]
    fn a_leap_second_belongs_to_its_own_hour() {
        let ms = event_time(&json!({"t": "2026-12-31T23:59:60Z"}), "t").unwrap();
        let last = event_time(&json!({"t": "2026-12-31T23:59:59.999Z"}), "t").unwrap();
        assert_eq!(ms, last);
        let ms = event_time(&json!({"t": "2026-12-31T23:59:60.5Z"}), "t").unwrap();
        assert_eq!(ms, last);
        assert_eq!(Hour::of_millis(ms).key(), "2026-12-31T23");
    }
}
