//! The group-commit writer: one thread owns the active segment. It takes every
//! append that is queued, writes them with one positional write, runs one
//! fdatasync, publishes the new durable frontier, and only then answers.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::format::{self, HEADER_LEN};
use super::io::{Filesystem, WalFile};
use super::{lock, AppendRequest, Durable, SeqRange, Shared, WalError};

/// An fdatasync slower than this is logged, as etcd does.
const SLOW_FSYNC: Duration = Duration::from_secs(1);

pub(super) struct Active {
    pub file: Box<dyn WalFile>,
    pub first_seq: u64,
    /// Bytes written and durable.
    pub len: u64,
}

/// Creates the segment that starts at `first_seq`, durably.
///
/// Death at any line leaves a state recovery handles: before the rename, a
/// `.wal.tmp` that open deletes; after the rename but before the directory
/// fsync, a segment that may or may not survive, holding no acknowledged
/// record either way, because nothing is acknowledged in it before this
/// function has returned and a frame fdatasync has followed. If the directory
/// fsync fails, the log fails; the next process never appends to this
/// segment (it starts its own, whose directory fsync covers this name too).
pub(super) fn create_segment(
    fs: &dyn Filesystem,
    dir: &Path,
    first_seq: u64,
) -> io::Result<Box<dyn WalFile>> {
    let name = format::segment_name(first_seq);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = fs.create(&tmp)?;
    file.write_all_at(&format::encode_header(first_seq), 0)?;
    file.sync_data()?;
    fs.rename(&tmp, &dir.join(&name))?;
    crate::debug::pause(crate::debug::Site::Roll);
    fs.sync_dir(dir)?;
    Ok(file)
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    /// The segment this process created at open; `None` if that failed (a
    /// full disk), in which case the first append creates it. Never a
    /// predecessor's segment.
    active: Option<Active>,
    next_seq: u64,
    /// Frames of the current group, reused across groups.
    buf: Vec<u8>,
    /// Callbacks of the requests whose frames are in `buf`, run by `flush`
    /// between the fdatasync and the publish.
    hooks: Vec<(super::OnDurable, SeqRange)>,
    warned_statvfs: bool,
}

/// Capacity of the group buffer kept between groups.
const RETAINED_BUF_BYTES: usize = 1024 * 1024;

impl Writer {
    pub fn new(shared: Arc<Shared>, active: Option<Active>) -> Self {
        let next_seq = shared.durable.borrow().next_seq;
        Writer {
            shared,
            active,
            next_seq,
            buf: Vec::new(),
            hooks: Vec::new(),
            warned_statvfs: false,
        }
    }

    pub fn run(mut self, mut rx: mpsc::Receiver<AppendRequest>) {
        let max_group = self.shared.cfg.max_group_bytes as u64;
        while let Some(first) = rx.blocking_recv() {
            // Everything already queued joins this group: under load, groups
            // grow by themselves and one fdatasync covers many requests.
            let mut bytes = first.frame_bytes;
            let mut group = vec![first];
            while bytes < max_group {
                match rx.try_recv() {
                    Ok(req) => {
                        bytes += req.frame_bytes;
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
    }

    fn commit(&mut self, group: Vec<AppendRequest>) {
        if let Some(why) = self.shared.failed() {
            for req in group {
                let _ = req.reply.send(Err(WalError::Failed(why.clone())));
            }
            return;
        }
        let mut accepted = self.admit(group);
        if accepted.is_empty() {
            return;
        }
        let written = self.write_group(&mut accepted);
        // Hooks of frames that never became durable are dropped uncalled.
        self.hooks.clear();
        match written {
            Ok(ranges) => {
                let c = &self.shared.counters;
                c.append_requests
                    .fetch_add(accepted.len() as u64, Ordering::Relaxed);
                for (req, range) in accepted.into_iter().zip(ranges) {
                    let _ = req.reply.send(Ok(range));
                }
            }
            Err(e) => {
                // Sticky: never retry a failed write or fsync (the kernel may
                // have dropped the dirty pages). None of this group is
                // acknowledged; whatever of it is on disk after a restart is
                // delivered unacknowledged, which is allowed.
                self.shared
                    .set_failed(format!("write or fdatasync failed: {e}"));
                let e = Arc::new(e);
                for req in accepted {
                    let _ = req.reply.send(Err(WalError::Io(e.clone())));
                }
            }
        }
    }

    /// Applies the quota to each request in order; refused ones are answered
    /// here and never touch the disk.
    fn admit(&mut self, group: Vec<AppendRequest>) -> Vec<AppendRequest> {
        let cfg = &self.shared.cfg;
        let c = &self.shared.counters;
        let free = match self.shared.fs.free_bytes(&cfg.dir) {
            Ok(free) => Some(free),
            Err(e) => {
                if !self.warned_statvfs {
                    self.warned_statvfs = true;
                    tracing::warn!(error = %e, "cannot read free disk space; min-free check disabled");
                }
                None
            }
        };
        let used = self.shared.disk_bytes.load(Ordering::Relaxed);
        let mut taken = 0u64;
        let mut accepted = Vec::with_capacity(group.len());
        for req in group {
            let need = taken + req.frame_bytes;
            if used + need > cfg.max_bytes {
                c.refused_full.fetch_add(1, Ordering::Relaxed);
                let _ = req.reply.send(Err(WalError::Full {
                    used: used + taken,
                    max: cfg.max_bytes,
                }));
            } else if free.is_some_and(|f| f.saturating_sub(need) < cfg.min_free_bytes) {
                c.refused_disk_low.fetch_add(1, Ordering::Relaxed);
                let _ = req.reply.send(Err(WalError::DiskLow {
                    free: free.unwrap_or(0).saturating_sub(taken),
                    min: cfg.min_free_bytes,
                }));
            } else {
                taken = need;
                accepted.push(req);
            }
        }
        accepted
    }

    fn write_group(&mut self, group: &mut [AppendRequest]) -> io::Result<Vec<SeqRange>> {
        let seg_limit = self.shared.cfg.segment_bytes;
        let mut ranges = Vec::with_capacity(group.len());
        if self.active.is_none() {
            self.roll()?;
        }
        for req in group.iter_mut() {
            // Roll before a request that would push a non-empty segment past
            // the limit. A single request larger than a segment gets one alone.
            let active_len = self.active.as_ref().map_or(HEADER_LEN as u64, |a| a.len);
            let pending = active_len + self.buf.len() as u64;
            if pending > HEADER_LEN as u64 && pending + req.frame_bytes > seg_limit {
                self.flush()?;
                self.roll()?;
            }
            let first = self.next_seq;
            for payload in &req.payloads {
                format::encode_frame(&mut self.buf, self.next_seq, payload);
                self.next_seq += 1;
            }
            let range = SeqRange {
                first,
                last: self.next_seq - 1,
            };
            if let Some(hook) = req.on_durable.take() {
                self.hooks.push((hook, range));
            }
            ranges.push(range);
        }
        self.flush()?;
        Ok(ranges)
    }

    /// Writes the buffered frames, fdatasyncs, then publishes them as durable.
    /// Dying before the fdatasync returns leaves bytes recovery may cut; none
    /// of them were acknowledged or visible to a reader.
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        active.file.write_all_at(&self.buf, active.len)?;
        crate::debug::pause(crate::debug::Site::Commit);
        let started = Instant::now();
        active.file.sync_data()?;
        let took = started.elapsed();
        if took > SLOW_FSYNC {
            tracing::warn!(seconds = took.as_secs_f64(), "slow WAL fdatasync");
        }
        let written = self.buf.len() as u64;
        self.buf.clear();
        // A burst of large batches grows the buffer to a whole group (up to
        // max-group-bytes); keeping that capacity would hold it in RSS for
        // good. Reallocating a large group's buffer costs one allocation per
        // fdatasync.
        self.buf.shrink_to(RETAINED_BUF_BYTES);
        active.len += written;
        let (active_first, active_len) = (active.first_seq, active.len);
        let c = &self.shared.counters;
        c.fsyncs.fetch_add(1, Ordering::Relaxed);
        c.fsync_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        c.bytes.fetch_add(written, Ordering::Relaxed);
        let published = self.shared.durable.borrow().next_seq;
        let records = self.next_seq - published;
        c.records.fetch_add(records, Ordering::Relaxed);
        if let Some(o) = self.shared.observer.get() {
            o.group_committed(records, written, took);
        }
        self.shared.disk_bytes.fetch_add(written, Ordering::Relaxed);
        lock(&self.shared.segments).insert(active_first, active_len);
        // Durable, not yet visible: what a hook installs (an idempotency
        // key) exists before replay can read the records.
        for (hook, range) in self.hooks.drain(..) {
            hook(range);
        }
        self.publish();
        Ok(())
    }

    /// Seals the active segment (already fully synced by `flush`) and starts
    /// the next one at `next_seq`.
    fn roll(&mut self) -> io::Result<()> {
        let file = create_segment(self.shared.fs.as_ref(), &self.shared.cfg.dir, self.next_seq)?;
        self.active = Some(Active {
            file,
            first_seq: self.next_seq,
            len: HEADER_LEN as u64,
        });
        lock(&self.shared.segments).insert(self.next_seq, HEADER_LEN as u64);
        self.shared
            .disk_bytes
            .fetch_add(HEADER_LEN as u64, Ordering::Relaxed);
        self.shared
            .counters
            .segments_created
            .fetch_add(1, Ordering::Relaxed);
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        let (active_first, active_len) = self
            .active
            .as_ref()
            .map_or((self.next_seq, HEADER_LEN as u64), |a| (a.first_seq, a.len));
        self.shared.durable.send_replace(Durable {
            next_seq: self.next_seq,
            active_first,
            active_len,
        });
    }
}
