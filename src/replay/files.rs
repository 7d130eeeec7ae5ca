//! The files sink (`[sink] kind = "files"`): replays the WAL into the
//! archive's hourly NDJSON files and summaries instead of Kafka, through the
//! same [`crate::archive::Writer`] as `sluice archive`.
//!
//! ```text
//!   start: delivered = committed offset (sled)
//!   pass:
//!     open the writer (cuts every file back to its checkpoint)
//!     checkpoint's wal_seq > delivered ──> skip to it (counted, logged)
//!     loop:
//!       batch = durable records from delivered + 1 (at most commit-records)
//!       append each value, then commit({"wal_seq": last}):
//!         write, fdatasync files and new entries, checkpoint durable
//!       delivered = last ──> offset flush (sled), then WAL GC
//!     any writer error ──> drop the writer, back off, next pass reopens it
//!     a failed fsync   ──> stop: no reopen, no offset flush past the last
//!                          good commit; the WAL is failed so the daemon
//!                          exits 1 and the restart reads the disk
//! ```
//!
//! Why a failed fsync is not retried in this process: after a failed
//! directory fsync following the checkpoint's rename, a reopen reads the new
//! checkpoint from the page cache, skips to its `wal_seq`, and the next
//! commit flushes the offset and lets GC free the WAL. After a power cut the
//! old checkpoint comes back and those records are in neither place. A
//! failed fdatasync of a file likewise leaves pages that read back as
//! written and will never reach the disk.
//!
//! What is on disk if the process dies:
//! - before the checkpoint's rename: the files hold lines past their
//!   checkpointed length; the next open cuts them off and replay produces
//!   them again from the committed offset (which is at or below the old
//!   checkpoint): nothing twice, nothing lost.
//! - after the rename, before the offset flush: the checkpoint is ahead of
//!   sled; the next start skips the records at or below its `wal_seq`.
//! - during WAL GC: the offset is flushed; the next open removes what GC
//!   left.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::offsets::Fate;
use super::replayer::Replayer;
use crate::archive::{ArchiveError, Writer, WriterMetrics, WriterOptions};
use crate::wal::ReadItem;

/// The files sink's settings (from `[archive]`).
#[derive(Debug, Clone)]
pub struct FilesSink {
    pub writer: WriterOptions,
    /// Records per commit, at most.
    pub max_batch: u64,
}

/// Record bytes per commit, at most: the batch is held in memory until the
/// writer has taken it, and `archive.commit-records` alone does not bound
/// that (events can be up to `limits.max-event-bytes` each).
const MAX_BATCH_BYTES: usize = 32 << 20;

enum End {
    Shutdown,
    Retry(String),
    /// A failed fsync: the writer must not be reopened in this process.
    Fatal(String),
}

/// `Retry`, or `Fatal` for a failed fsync ([`ArchiveError::is_sticky`]).
fn ended(what: &str, e: &ArchiveError) -> End {
    let why = format!("{what}: {e}");
    if e.is_sticky() {
        End::Fatal(why)
    } else {
        End::Retry(why)
    }
}

/// The WAL position a commit records: the last sequence number in the
/// files, and the data directory's identity so that an archive directory
/// never resumes from another data directory's numbers.
fn progress(seq: u64) -> Value {
    json!({ "wal_seq": seq, "instance": crate::instance::current() })
}

impl Replayer {
    /// [`Replayer::run`] for the files sink.
    pub(super) async fn run_files(
        &self,
        sink: &FilesSink,
        mut delivered: u64,
        mut shutdown: watch::Receiver<bool>,
    ) -> u64 {
        let initial = Duration::from_millis(self.cfg.backoff_initial_ms);
        let max = Duration::from_millis(self.cfg.backoff_max_ms);
        let mut backoff = initial;
        while !*shutdown.borrow() {
            let before = delivered;
            let end = self.files_pass(sink, &mut delivered, &mut shutdown).await;
            if delivered > before {
                backoff = initial;
            }
            match end {
                End::Shutdown => break,
                End::Fatal(why) => {
                    // Nothing past `delivered` (the last commit whose every
                    // fsync succeeded) is flushed; the WAL keeps the rest.
                    self.stats
                        .sink_fsync_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats.sink_down.store(true, Ordering::Relaxed);
                    tracing::error!(reason = %why, committed_through = delivered,
                        "archive files sink: an fsync failed; what this process reads back may be the page cache's, not the disk's. Stopping the daemon (exit 1) so that the restart recovers from the disk");
                    self.wal.fail(format!("archive files sink: {why}"));
                    break;
                }
                End::Retry(why) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if !self.stats.sink_down.swap(true, Ordering::Relaxed) {
                        tracing::error!(reason = %why, from_seq = delivered + 1, "archive files sink down: replay backs off and reopens the files from their checkpoint; ingest continues until the WAL quota");
                    } else {
                        tracing::warn!(reason = %why, backoff_ms = backoff.as_millis() as u64, "archive files sink still down");
                    }
                    if sleep_or_shutdown(backoff, &mut shutdown).await {
                        break;
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        delivered
    }

    /// One writer's life: open, skip what its checkpoint already holds, then
    /// append and commit batches until shutdown or an error.
    async fn files_pass(
        &self,
        sink: &FilesSink,
        delivered: &mut u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let opts = sink.writer.clone();
        let opened = tokio::task::spawn_blocking(move || Writer::open(opts)).await;
        let (mut writer, checkpointed) = match opened {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => return ended("opening the archive", &e),
            Err(e) => return End::Retry(format!("opening the archive: {e}")),
        };
        if checkpointed.is_null() && *delivered > 0 {
            // A fresh archive directory, yet replay already delivered records:
            // to Kafka (the sink was switched), or to an archive directory
            // that was replaced or moved, or lost (before
            // issue 25's durable directories a power cut could drop it whole
            // after the WAL below the offset was deleted). Those records are
            // not in these files and the WAL no longer holds them: say so.
            self.stats
                .sink_fresh_archive_records
                .fetch_add(*delivered, Ordering::Relaxed);
            tracing::error!(
                first_seq = 1,
                last_seq = *delivered,
                dir = %sink.writer.dir.display(),
                "archive files sink: the archive directory is new but records up to last_seq were delivered before it existed (to Kafka, or to an archive directory since replaced, moved or lost): they are not in these files"
            );
        }
        match self.resume_point(&checkpointed, *delivered) {
            Ok(Some(through)) => {
                // Already in the files: killed after the checkpoint's rename
                // and before the offset flush. Not loss; they are there.
                let n = through - *delivered;
                self.stats
                    .sink_checkpointed_skipped
                    .fetch_add(n, Ordering::Relaxed);
                tracing::info!(
                    first_seq = *delivered + 1,
                    last_seq = through,
                    records = n,
                    "records already in the archive's checkpoint: not written again"
                );
                *delivered = through;
                self.stats
                    .delivered_through
                    .store(through, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(why) => return End::Retry(why),
        }
        let metrics = writer.metrics();
        self.stats.sink_checkpoint_over_bound.fetch_add(
            metrics.checkpoint_over_bound.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        // Counted once per open (the writer counts what its open dropped).
        self.stats.sink_checkpoint_entries_dropped.fetch_add(
            metrics.checkpoint_entries_dropped.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let base = Totals::of_stats(self);
        let mut reader = self.wal.reader(*delivered + 1);
        // Set on shutdown: the drain deadline.
        let mut draining: Option<std::time::Instant> = None;
        loop {
            // Wait for the first durable record, or shutdown.
            let first = match reader.try_next() {
                Ok(Some(item)) => item,
                Ok(None) if draining.is_some() => return self.close(writer, *delivered).await,
                Ok(None) => {
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => {
                            // Ingest has stopped: deliver what is durable,
                            // within the drain deadline.
                            draining = Some(std::time::Instant::now() + self.drain);
                            continue;
                        }
                        item = reader.next() => match item {
                            Ok(item) => item,
                            Err(e) => return End::Retry(format!("WAL read: {e}")),
                        },
                        // Quiet: an empty commit seals the hours idle for
                        // `idle-close-secs` (their summaries become final).
                        _ = tokio::time::sleep(sink.writer.idle_close.max(Duration::from_secs(1))) => {
                            let at = *delivered;
                            let sealed = tokio::task::spawn_blocking(move || {
                                writer.commit(&progress(at)).map(|()| writer)
                            })
                            .await;
                            writer = match sealed {
                                Ok(Ok(w)) => w,
                                Ok(Err(e)) => return ended("archive commit", &e),
                                Err(e) => return End::Retry(format!("archive commit task: {e}")),
                            };
                            base.publish(self, &metrics);
                            continue;
                        }
                    }
                }
                Err(e) => return End::Retry(format!("WAL read: {e}")),
            };
            if let Some(d) = draining {
                if std::time::Instant::now() >= d {
                    tracing::warn!(
                        next_seq = reader.next_seq(),
                        "drain deadline passed; the rest stays in the WAL"
                    );
                    return self.close(writer, *delivered).await;
                }
            }
            // Everything durable now, up to a batch: one fdatasync round
            // and one checkpoint for all of it (group commit).
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            let mut last = *delivered;
            let mut item = Some(first);
            while let Some(next) = item.take() {
                match next {
                    ReadItem::Record { seq, record, .. } => {
                        batch_bytes += record.value.len();
                        batch.push((seq, record.value));
                        last = seq;
                    }
                    ReadItem::Gap(g) => {
                        // Already counted and logged by the WAL; the range
                        // is passed so damage never wedges the sink.
                        self.stats.gap_records.fetch_add(g.len(), Ordering::Relaxed);
                        if let Err(e) = self.offsets.record_fate(g.first, g.last, Fate::Lost) {
                            return End::Retry(format!("recording lost range: {e}"));
                        }
                        last = g.last;
                    }
                }
                if (batch.len() as u64) < sink.max_batch && batch_bytes < MAX_BATCH_BYTES {
                    item = match reader.try_next() {
                        Ok(i) => i,
                        Err(e) => return End::Retry(format!("WAL read: {e}")),
                    };
                }
            }
            let n = batch.len() as u64;
            let t0 = std::time::Instant::now();
            // The writer moves into the blocking task and comes back only
            // on success: after an error it must not be used again.
            let written = tokio::task::spawn_blocking(move || {
                for (seq, value) in &batch {
                    writer.append(value, &json!({ "seq": seq }))?;
                    if writer.wants_commit() {
                        // Twice archive.max-open-hours open: commit through
                        // this record, which seals the least recently
                        // written hours, before the batch opens more.
                        writer.commit(&progress(*seq))?;
                    }
                }
                // Dying here (after the fdatasyncs, before the checkpoint's
                // rename) leaves uncommitted tails that the next open cuts.
                writer.commit(&progress(last))?;
                Ok::<_, crate::archive::ArchiveError>(writer)
            })
            .await;
            writer = match written {
                Ok(Ok(w)) => w,
                Ok(Err(e)) => return ended("archive write", &e),
                Err(e) => return End::Retry(format!("archive write task: {e}")),
            };
            self.stats
                .sink_commit_micros
                .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            base.publish(self, &metrics);
            if self.stats.sink_down.swap(false, Ordering::Relaxed) {
                tracing::info!("archive files sink up again");
            }
            self.stats.produced.fetch_add(n, Ordering::Relaxed);
            self.stats.delivered.fetch_add(n, Ordering::Relaxed);
            // Only now, with the lines and their checkpoint durable, may the
            // committed offset move (and GC free the WAL below it).
            *delivered = last;
            self.stats.delivered_through.store(last, Ordering::Relaxed);
            self.commit(last).await;
        }
    }

    /// Where the checkpoint says the files end, if past `delivered`.
    fn resume_point(&self, checkpointed: &Value, delivered: u64) -> Result<Option<u64>, String> {
        if checkpointed.is_null() {
            return Ok(None);
        }
        let Some(seq) = checkpointed.get("wal_seq").and_then(Value::as_u64) else {
            return Err(format!(
                "the archive's checkpoint holds {checkpointed}, not a WAL position: it belongs to `sluice archive`; give the files sink its own archive.dir"
            ));
        };
        let ours = crate::instance::current();
        let theirs = checkpointed.get("instance").and_then(Value::as_str);
        if theirs != ours {
            return Err(format!(
                "the archive's checkpoint was written from data directory instance {theirs:?}, this is {ours:?}: its sequence numbers are not ours; give each data directory its own archive.dir"
            ));
        }
        let durable_last = self.wal.durable().borrow().next_seq.saturating_sub(1);
        if seq > durable_last {
            return Err(format!(
                "the archive's checkpoint is at WAL seq {seq}, past the WAL's last durable record {durable_last}"
            ));
        }
        Ok((seq > delivered).then_some(seq))
    }

    /// A clean stop: seal every hour with the position reached.
    async fn close(&self, mut writer: Writer, delivered: u64) -> End {
        let closed =
            tokio::task::spawn_blocking(move || writer.close_all(&progress(delivered))).await;
        match closed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "closing the archive files failed; the next start cuts them back to their checkpoint")
            }
            Err(e) => tracing::error!(error = %e, "closing the archive files failed"),
        }
        End::Shutdown
    }
}

/// The process-wide sink counters when a writer opened; a writer's own
/// counters start at zero, so the totals are these plus the writer's.
struct Totals {
    lines: u64,
    bytes: u64,
    fsyncs: u64,
    unparsed: u64,
    values_cut: u64,
    sealed_over_bound: u64,
    far_past: u64,
    far_future: u64,
}

impl Totals {
    fn of_stats(r: &Replayer) -> Totals {
        let s = &r.stats;
        Totals {
            lines: s.sink_lines.load(Ordering::Relaxed),
            bytes: s.sink_bytes.load(Ordering::Relaxed),
            fsyncs: s.sink_fsyncs.load(Ordering::Relaxed),
            unparsed: s.sink_unparsed.load(Ordering::Relaxed),
            values_cut: s.sink_values_cut.load(Ordering::Relaxed),
            sealed_over_bound: s.sink_files_sealed_over_bound.load(Ordering::Relaxed),
            far_past: s.sink_events_far_past.load(Ordering::Relaxed),
            far_future: s.sink_events_far_future.load(Ordering::Relaxed),
        }
    }

    fn publish(&self, r: &Replayer, m: &WriterMetrics) {
        let s = &r.stats;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        s.sink_lines
            .store(self.lines + g(&m.lines), Ordering::Relaxed);
        s.sink_bytes
            .store(self.bytes + g(&m.bytes), Ordering::Relaxed);
        s.sink_fsyncs
            .store(self.fsyncs + g(&m.fsyncs), Ordering::Relaxed);
        s.sink_unparsed
            .store(self.unparsed + g(&m.unparsed), Ordering::Relaxed);
        s.sink_files_open.store(g(&m.files_open), Ordering::Relaxed);
        s.sink_checkpoint_bytes
            .store(g(&m.checkpoint_bytes), Ordering::Relaxed);
        s.sink_checkpoint_written_bytes
            .store(g(&m.checkpoint_written_bytes), Ordering::Relaxed);
        s.sink_values_cut
            .store(self.values_cut + g(&m.values_cut), Ordering::Relaxed);
        s.sink_files_sealed_over_bound.store(
            self.sealed_over_bound + g(&m.files_sealed_over_bound),
            Ordering::Relaxed,
        );
        s.sink_events_far_past
            .store(self.far_past + g(&m.events_far_past), Ordering::Relaxed);
        s.sink_events_far_future
            .store(self.far_future + g(&m.events_far_future), Ordering::Relaxed);
    }
}

/// Sleeps, or returns true early if shutdown was requested.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
