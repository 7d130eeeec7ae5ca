//! Opening the log: what is on disk after any crash becomes a consistent
//! state again, without ever panicking and without scanning the backlog.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::format::{self, HEADER_LEN, SEGMENT_SUFFIX, TMP_SUFFIX};
use super::io::{Filesystem, WalFile};
use super::reader::{Gap, GapReason};
use super::segment::{read_full, FrameCursor, ScanStop, Step};
use super::writer::{create_segment, Active};
use super::{quarantine_copy, Durable, Shared, WalConfig, WalCounters, WalError};

/// What open found and did. Everything in here was also logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the log after recovery.
    pub segments: usize,
    /// The sequence number the next append gets.
    pub next_seq: u64,
    /// Half-created segments (`.wal.tmp`) that were deleted.
    pub removed_tmp: usize,
    /// Segments wholly at or below the committed offset that were deleted
    /// (a crash between the offset flush and GC leaves these).
    pub removed_consumed: usize,
    /// Bytes cut from the tail of the last segment.
    pub truncated_bytes: u64,
    /// Files written to the quarantine directory.
    pub quarantined: Vec<String>,
    /// Damaged bytes that could not be copied to quarantine (e.g. disk full);
    /// recovery went on without them.
    pub not_quarantined: Vec<String>,
    /// Sequence ranges known to be lost. A segment whose header is unreadable
    /// and that was the last one has an unknown end; it is reported as
    /// `first..=first` and flagged in the log.
    pub lost: Vec<Gap>,
}

/// Opens the log in the order of its crash states, the way raft-engine scans
/// before it recovers: list the files, check every header, drop what the
/// committed offset already covers, repair the last segment's tail, then
/// start a fresh active segment and report the range missing before the
/// oldest one. Each step is its own function below; every step before
/// `choose_active` only removes, cuts or rewrites what a predecessor left,
/// so dying inside any of them leaves a state the next open repeats.
pub(super) fn open(
    cfg: WalConfig,
    fs: Arc<dyn Filesystem>,
    committed: u64,
) -> Result<(Shared, Option<Active>, RecoveryReport), WalError> {
    // Creates wal/ (and the data dir) if missing and fsyncs the parent of each
    // new directory: a segment fsynced inside an unsynced directory can still
    // vanish with it.
    fs.create_dir_all(&cfg.dir).map_err(WalError::io)?;
    let counters = WalCounters::default();
    let mut report = RecoveryReport::default();

    let firsts = list_segments(fs.as_ref(), &cfg, &mut report)?;
    let (mut sizes, bad_header_last) = check_headers(
        fs.as_ref(),
        &cfg,
        &counters,
        &mut report,
        &firsts,
        committed,
    )?;
    remove_consumed(fs.as_ref(), &cfg, &mut report, &mut sizes, committed)?;
    let last_seq = repair_tail(
        fs.as_ref(),
        &cfg,
        &counters,
        &mut report,
        &mut sizes,
        committed,
    )?;
    let last_seq = reserve_bad_header_last(&mut report, bad_header_last, last_seq);
    let next_seq = last_seq + 1;
    let active = choose_active(fs.as_ref(), &cfg, &counters, &mut sizes, next_seq);
    find_missing_prefix(&mut report, &sizes, bad_header_last, committed);

    report.segments = sizes.len();
    report.next_seq = next_seq;
    let disk_bytes = sizes.values().sum();
    let (durable, _) = watch::channel(Durable {
        next_seq,
        active_first: next_seq,
        active_len: HEADER_LEN as u64,
    });
    let shared = Shared {
        observer: std::sync::OnceLock::new(),
        cfg,
        fs,
        segments: Mutex::new(sizes),
        gc: Mutex::new(()),
        disk_bytes: AtomicU64::new(disk_bytes),
        durable,
        failed: Mutex::new(None),
        failure: watch::channel(false).0,
        counters,
        reported_losses: Mutex::default(),
    };
    for gap in &report.lost {
        shared.report_loss(gap);
    }
    tracing::info!(
        segments = report.segments,
        next_seq,
        committed,
        disk_bytes,
        "WAL recovered"
    );
    Ok((shared, active, report))
}

/// Lists `wal/` and returns the first sequence numbers of the segments, in
/// ascending order. Crash state handled: a roll killed before its rename
/// leaves a `.wal.tmp` that never held a record; it is deleted here.
fn list_segments(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    report: &mut RecoveryReport,
) -> Result<Vec<u64>, WalError> {
    let io = WalError::io;
    let mut firsts = Vec::new();
    for name in fs.list(&cfg.dir).map_err(io)? {
        if name.ends_with(TMP_SUFFIX) {
            // A roll died before its rename: the segment never held a record.
            remove_file(fs, &cfg.dir.join(&name)).map_err(io)?;
            report.removed_tmp += 1;
            tracing::info!(file = %name, "removed half-created segment");
        } else if let Some(first) = format::parse_segment_name(&name) {
            firsts.push(first);
        } else if name.ends_with(SEGMENT_SUFFIX) {
            tracing::warn!(file = %name, "ignoring a .wal file with a malformed name");
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Reads every segment's header and returns the size of each segment kept,
/// plus the first sequence number of a last segment that had to be set aside
/// whole. Crash states handled: a header damaged on the device (bad sector,
/// bit flip) or naming another first sequence number. The last segment's
/// header is rewritten from its name if intact frames follow it; any other
/// bad-header segment moves to quarantine whole and its range is reported
/// lost (unless already delivered).
fn check_headers(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    firsts: &[u64],
    committed: u64,
) -> Result<(BTreeMap<u64, u64>, Option<u64>), WalError> {
    let io = WalError::io;
    // Headers: 24 bytes per segment, read from the device (not the page
    // cache). A segment whose header is unreadable cannot be trusted at all;
    // it moves to quarantine whole.
    let mut sizes = BTreeMap::new();
    let mut bad_header_last = None;
    for (i, &first) in firsts.iter().enumerate() {
        let path = cfg.dir.join(format::segment_name(first));
        let file = fs.open_direct(&path).map_err(io)?;
        let mut head = [0u8; HEADER_LEN];
        let n = read_full(file.as_ref(), &mut head, 0).map_err(io)?;
        let problem = match format::decode_header(&head[..n]) {
            Ok(h) if h.first_seq == first => None,
            Ok(h) => Some(format!(
                "header says first sequence {} but the name says {first}",
                h.first_seq
            )),
            Err(e) => Some(e.to_string()),
        };
        let Some(problem) = problem else {
            sizes.insert(first, file.len().map_err(io)?);
            continue;
        };
        if i + 1 == firsts.len() {
            // The last segment holds acknowledged frames that no later
            // segment bounds; its header repeats only what the name says.
            if let Some(len) =
                repair_last_header(fs, cfg, counters, report, first, &problem, file.as_ref())?
            {
                sizes.insert(first, len);
                continue;
            }
        }
        quarantine_bad_header(fs, cfg, counters, report, first, &problem);
        match firsts.get(i + 1) {
            // Every record in it was delivered already: not a loss.
            Some(&next) if next - 1 <= committed => tracing::info!(
                file = %format::segment_name(first),
                "the bad-header segment lies wholly at or below the committed offset: nothing lost"
            ),
            Some(&next) => report.lost.push(Gap {
                first: first.max(committed + 1),
                last: next - 1,
                reason: GapReason::BadHeader,
            }),
            None => bad_header_last = Some(first),
        }
    }
    Ok((sizes, bad_header_last))
}

/// Moves a segment whose header cannot be trusted to quarantine, durably
/// (both directories fsynced). If the move fails (a full disk, a read-only
/// quarantine), the file stays in `wal/` and is skipped; that is counted and
/// logged, and recovery goes on.
fn quarantine_bad_header(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    first: u64,
    problem: &str,
) {
    let path = cfg.dir.join(format::segment_name(first));
    let qname = super::unique_quarantine_name(
        fs,
        &cfg.quarantine_dir,
        &format!("{}.bad-header", format::segment_name(first)),
    );
    let moved = fs
        .create_dir_all(&cfg.quarantine_dir)
        .and_then(|()| fs.rename(&path, &cfg.quarantine_dir.join(&qname)))
        .and_then(|()| fs.sync_dir(&cfg.quarantine_dir))
        .and_then(|()| fs.sync_dir(&cfg.dir));
    match moved {
        Ok(()) => {
            counters.quarantined_files.fetch_add(1, Ordering::Relaxed);
            tracing::error!(file = %qname, %problem, "quarantined a segment with an unreadable header");
            report.quarantined.push(qname);
        }
        Err(e) => {
            counters.quarantine_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(file = %format::segment_name(first), %problem, error = %e, "a segment has an unreadable header and could not be moved to quarantine; skipping it");
            report.not_quarantined.push(qname);
        }
    }
}

/// Deletes the segments wholly at or below the committed offset. Crash state
/// handled: a kill between the offset flush and GC's unlinks leaves them.
fn remove_consumed(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    report: &mut RecoveryReport,
    sizes: &mut BTreeMap<u64, u64>,
    committed: u64,
) -> Result<(), WalError> {
    // Segments wholly consumed: a crash between the offset flush and the
    // unlinks of GC leaves them. Remove in ascending order (see Wal::remove_through).
    let firsts: Vec<u64> = sizes.keys().copied().collect();
    for pair in firsts.windows(2) {
        if pair[1] - 1 > committed {
            break;
        }
        remove_file(fs, &cfg.dir.join(format::segment_name(pair[0]))).map_err(WalError::io)?;
        sizes.remove(&pair[0]);
        report.removed_consumed += 1;
    }
    Ok(())
}

/// Recovers the last segment until one ends cleanly, and returns the highest
/// sequence number the log holds (at least `committed`). Crash states
/// handled: frames written but not fdatasynced, a torn tail, damage in front
/// of intact frames (split off, see `recover_last`), and a segment holding
/// only its header (deleted: numbering continues in the new segment).
fn repair_tail(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    sizes: &mut BTreeMap<u64, u64>,
    committed: u64,
) -> Result<u64, WalError> {
    // The last segment is the only one a predecessor may have left unsynced
    // or damaged at its end. Damage followed by intact frames splits it; the
    // part after the damage becomes the new last segment and is checked in
    // turn.
    let mut last_seq = committed;
    while let Some((&first, _)) = sizes.iter().next_back() {
        match recover_last(fs, cfg, counters, report, first, committed)? {
            Last::Split {
                len,
                resumed_first,
                resumed_len,
            } => {
                sizes.insert(first, len);
                sizes.insert(resumed_first, resumed_len);
            }
            Last::Done { len, records } => {
                if records == 0 {
                    // Only a header: numbering continues in the new segment.
                    remove_file(fs, &cfg.dir.join(format::segment_name(first)))
                        .map_err(WalError::io)?;
                    sizes.remove(&first);
                } else {
                    sizes.insert(first, len);
                }
                last_seq = last_seq.max((first + records).saturating_sub(1));
                break;
            }
        }
    }
    Ok(last_seq)
}

/// Accounts for a last segment set aside whole by `check_headers` (its header
/// unreadable, no intact frame after it) and returns the highest sequence
/// number never to hand out again. Its end is unknown: the loss is reported
/// as `first..=first` and flagged in the log.
fn reserve_bad_header_last(
    report: &mut RecoveryReport,
    bad_header_last: Option<u64>,
    mut last_seq: u64,
) -> u64 {
    if let Some(first) = bad_header_last {
        tracing::error!(
            first_seq = first,
            "the last segment's header was unreadable and no intact frame follows it: records from this sequence number on are lost, count unknown"
        );
        report.lost.push(Gap {
            first,
            last: first,
            reason: GapReason::BadHeader,
        });
        // Never hand this number out again: it may have been acknowledged,
        // and the file (in quarantine, or still here if it could not be
        // moved) must not be replaced by a new segment of the same name.
        last_seq = last_seq.max(first);
    }
    last_seq
}

/// Creates the segment new appends go to, starting at `next_seq`, and adds it
/// to `sizes`. Crash states handled: a tail this process did not fdatasync,
/// and a name a killed predecessor renamed without fsyncing `wal/`.
fn choose_active(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    sizes: &mut BTreeMap<u64, u64>,
    next_seq: u64,
) -> Option<Active> {
    // New appends go to a fresh segment: never behind a tail that this
    // process did not fdatasync itself (after a failed fsync the kernel may
    // later write new frames past a hole). Creating it fsyncs wal/, which
    // also makes durable any name a killed predecessor renamed but did not
    // fsync, before the first 202. If it cannot be created now (a full disk),
    // start anyway so that replay and GC can free space; the writer creates
    // it at the first append, and a failure then fails the log.
    match create_segment(fs, &cfg.dir, next_seq) {
        Ok(file) => {
            sizes.insert(next_seq, HEADER_LEN as u64);
            counters.segments_created.fetch_add(1, Ordering::Relaxed);
            Some(Active {
                file,
                first_seq: next_seq,
                len: HEADER_LEN as u64,
            })
        }
        Err(e) => {
            tracing::error!(error = %e, next_seq, "cannot create the first WAL segment at open; starting without it (appends will try again)");
            None
        }
    }
}

/// Reports the records between the committed offset and the oldest segment
/// (or set-aside last segment) as missing. State handled: the oldest
/// segments are gone from `wal/` although the committed offset never covered
/// them (removed outside sluice); the records are lost, never renumbered.
fn find_missing_prefix(
    report: &mut RecoveryReport,
    sizes: &BTreeMap<u64, u64>,
    bad_header_last: Option<u64>,
    committed: u64,
) {
    // Records between the committed offset and the first segment are gone.
    let oldest = sizes.keys().next().copied();
    if let Some(first) = oldest.into_iter().chain(bad_header_last).min() {
        if first > committed + 1 {
            report.lost.push(Gap {
                first: committed + 1,
                last: first - 1,
                reason: GapReason::Missing,
            });
        }
    }
}

/// What became of the last segment.
enum Last {
    /// It ends cleanly at `len` (cut if needed) with `records` records.
    Done { len: u64, records: u64 },
    /// Damage with intact frames after it: those frames were copied to a new
    /// segment starting at `resumed_first`, and this one was cut at `len`.
    Split {
        len: u64,
        resumed_first: u64,
        resumed_len: u64,
    },
}

/// Makes the last segment durable and trustworthy: syncs it, walks it as the
/// device (not the page cache) holds it, treats frames that are not really
/// on disk as never written, counts damage exactly, and cuts a torn tail.
/// The walk stops at the first damage: `split_at_damage` handles damage with
/// intact frames after it, `cut_torn_tail` a tail with none.
fn recover_last(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    first: u64,
    committed: u64,
) -> Result<Last, WalError> {
    let io = WalError::io;
    let name = format::segment_name(first);
    let path = cfg.dir.join(&name);
    let file = fs.open(&path).map_err(io)?;
    // A predecessor killed between its pwrite and its fdatasync left frames
    // dirty in the page cache: write them now. If its writeback failed, this
    // reports the error to us, or, if it was already reported, succeeds
    // having written nothing: pages that failed stay in the cache, marked
    // clean. Either way the outcome decides nothing; the direct read does.
    if let Err(e) = file.sync_data() {
        tracing::warn!(segment = %name, error = %e, "fdatasync of the last WAL segment failed at open; keeping only what the disk really holds");
    }
    let direct = fs.open_direct(&path).map_err(io)?;
    let file_len = direct.len().map_err(io)?;
    let (_, mut cursor) = match FrameCursor::open(direct).map_err(io)? {
        Ok(v) => v,
        // The header was read from the device a moment ago; only a concurrent
        // writer could change that, and the data-dir lock rules that out.
        Err(e) => return Err(WalError::io(std::io::Error::other(e))),
    };
    let seg = LastSegment {
        name: &name,
        path: &path,
        file: file.as_ref(),
        first,
        file_len,
    };
    let mut expected = first;
    let (tail_at, stop) = loop {
        let (bad_at, stop, search_from) = match cursor.next_frame().map_err(io)? {
            Step::Frame { frame, .. } if frame.seq == expected => {
                expected += 1;
                continue;
            }
            Step::Frame { frame, offset } => (
                offset,
                ScanStop::Sequence {
                    expected,
                    found: frame.seq,
                },
                offset,
            ),
            Step::End {
                offset,
                error: None,
            } => break (offset, None),
            Step::End {
                offset,
                error: Some(e),
            } => (offset, ScanStop::Frame(e), offset + 1),
        };
        // Is anything intact after the damage? A torn write leaves nothing
        // valid behind it; a damaged frame (a flipped length, a bad sector)
        // in front of acknowledged frames does. Frames are at least 17 bytes,
        // which bounds the sequence numbers worth matching.
        let max_seq = expected.saturating_add((file_len - bad_at) / 17 + 1);
        let Some(resumed) = cursor
            .resync(search_from, expected + 1..=max_seq)
            .map_err(io)?
        else {
            break (bad_at, Some(stop));
        };
        let damage = Damage {
            bad_at,
            resume_at: cursor.position(),
            resumed,
            stop,
            gap: Gap {
                first: expected,
                last: resumed - 1,
                reason: GapReason::Corrupt,
            },
        };
        let (last, lost) = split_at_damage(fs, cfg, counters, report, &seg, &mut cursor, damage)?;
        push_loss(report, lost, committed);
        return Ok(last);
    };
    if tail_at < file_len {
        cut_torn_tail(fs, cfg, counters, report, &seg, tail_at, stop.as_ref())?;
    }
    // Makes the cut durable, and the frames we keep: they were read from the
    // device, but a predecessor may have died before its fdatasync flushed
    // the device's write cache.
    file.sync_data().map_err(io)?;
    Ok(Last::Done {
        len: tail_at,
        records: expected - first,
    })
}

/// The last segment as `recover_last` opened it.
struct LastSegment<'a> {
    name: &'a str,
    path: &'a std::path::Path,
    /// Opened through the page cache: for the sync and the cut.
    file: &'a dyn WalFile,
    first: u64,
    /// Its length as the device reported it before the walk.
    file_len: u64,
}

/// Damage inside the last segment with an intact frame after it.
struct Damage {
    /// Where the damage starts.
    bad_at: u64,
    /// Where the intact frame `resumed` starts.
    resume_at: u64,
    resumed: u64,
    stop: ScanStop,
    /// The records the damage holds: from the expected one up to `resumed`.
    gap: Gap,
}

/// Damage followed by intact frames: a damaged frame (a flipped length, a
/// bad sector) in front of acknowledged frames. Crash states handled: the
/// intact frames are copied to their own segment and this one is cut at the
/// damage (`Split`); if the copy fails (a full disk), the segment stays whole
/// and everything up to its highest intact frame is counted lost (`Done`).
/// Returns the outcome and the range lost, for the caller to report.
fn split_at_damage(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    seg: &LastSegment,
    cursor: &mut FrameCursor,
    damage: Damage,
) -> Result<(Last, Gap), WalError> {
    let io = WalError::io;
    let Damage {
        bad_at,
        resume_at,
        resumed,
        stop,
        gap,
    } = damage;
    let (name, file, file_len) = (seg.name, seg.file, seg.file_len);
    tracing::error!(
        segment = %name,
        offset = bad_at,
        resumes_at = resume_at,
        first_seq = gap.first,
        last_seq = gap.last,
        reason = %stop,
        "damage inside the last WAL segment with intact frames after it"
    );
    let src = fs.open_direct(seg.path).map_err(io)?;
    if resume_at > bad_at {
        keep_evidence(
            fs,
            cfg,
            counters,
            report,
            src.as_ref(),
            (bad_at, resume_at),
            &format!("{name}.corrupt-{bad_at}"),
        );
    }
    // The frames after the damage move to their own segment, named by
    // their first sequence number, so that this one can be cut at the
    // damage and every segment stays contiguous. The copy (file, name and
    // directory) is durable before the cut: dying in between leaves this
    // segment whole and sealed by the copy, and the reader reports the
    // same range.
    match copy_to_segment(fs, &cfg.dir, resumed, src.as_ref(), (resume_at, file_len)) {
        Ok(resumed_len) => {
            file.set_len(bad_at).map_err(io)?;
            file.sync_data().map_err(io)?;
            // Only the damaged bytes are gone: the frames after them were
            // copied to their own segment (counting the whole cut made one
            // corrupt frame read as 24,600 bytes truncated).
            let cut = resume_at - bad_at;
            report.truncated_bytes += cut;
            counters.truncated_bytes.fetch_add(cut, Ordering::Relaxed);
            let last = Last::Split {
                len: bad_at,
                resumed_first: resumed,
                resumed_len,
            };
            Ok((last, gap))
        }
        Err(e) => {
            // No room for the copy (a full disk): leave the segment whole.
            // The new active segment seals it, and a sealed segment's
            // reader stops at the damage, so the intact frames after it
            // are unreachable: count them with the damaged range, exactly.
            // Up to the highest intact frame, past any further damage:
            // all of it is unreachable, and none of it may be renumbered.
            let last = walk_to_end(cursor, resumed, file_len).map_err(io)?;
            tracing::error!(segment = %name, error = %e, first_seq = gap.first, last_seq = last, "could not copy the intact frames after the damage to a new segment; they are counted as lost");
            file.sync_data().map_err(io)?;
            let lost = Gap {
                first: gap.first,
                last,
                reason: GapReason::Corrupt,
            };
            let done = Last::Done {
                len: file_len,
                records: last + 1 - seg.first,
            };
            Ok((done, lost))
        }
    }
}

/// A tail with no intact frame after it: a write torn by a kill or power
/// loss, or bytes a predecessor wrote but the device never held. Crash state
/// handled: the tail is cut at `tail_at` (kept in quarantine first unless it
/// is all zeros, the usual preallocated or unwritten tail). The caller's
/// fdatasync makes the cut durable.
fn cut_torn_tail(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    seg: &LastSegment,
    tail_at: u64,
    stop: Option<&ScanStop>,
) -> Result<(), WalError> {
    let io = WalError::io;
    let (name, file_len) = (seg.name, seg.file_len);
    let cut = file_len - tail_at;
    let why = stop.map_or_else(|| "trailing bytes".to_string(), |s| s.to_string());
    let src = fs.open_direct(seg.path).map_err(io)?;
    if !all_zero(src.as_ref(), tail_at, file_len).map_err(io)? {
        keep_evidence(
            fs,
            cfg,
            counters,
            report,
            src.as_ref(),
            (tail_at, file_len),
            &format!("{name}.tail-{tail_at}"),
        );
    }
    seg.file.set_len(tail_at).map_err(io)?;
    report.truncated_bytes += cut;
    counters.truncated_bytes.fetch_add(cut, Ordering::Relaxed);
    tracing::warn!(
        segment = %name,
        offset = tail_at,
        bytes = cut,
        reason = %why,
        "cut the torn tail of the last WAL segment"
    );
    Ok(())
}

/// Records a lost range, minus any part at or below the committed offset
/// (those records were delivered).
fn push_loss(report: &mut RecoveryReport, gap: Gap, committed: u64) {
    if gap.last <= committed {
        return;
    }
    report.lost.push(Gap {
        first: gap.first.max(committed + 1),
        ..gap
    });
}

/// Copies damaged bytes to quarantine. A failure (typically a full disk) does
/// not stop recovery: refusing to start would keep replay and GC from ever
/// freeing space. It is counted and logged with what was not kept.
fn keep_evidence(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    src: &dyn WalFile,
    range: (u64, u64),
    qname: &str,
) {
    match quarantine_copy(fs, &cfg.quarantine_dir, counters, src, range, qname) {
        Ok(saved) => report.quarantined.push(saved),
        Err(e) => {
            counters.quarantine_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                file = qname,
                from_offset = range.0,
                to_offset = range.1,
                bytes = range.1 - range.0,
                error = %e,
                "could not copy damaged WAL bytes to quarantine; starting without keeping them"
            );
            report.not_quarantined.push(qname.to_string());
        }
    }
}

/// Creates segment `first_seq` holding bytes `from..to` of `src` (whole
/// frames, starting with `first_seq`'s), durably: written as `.tmp`,
/// fdatasynced, renamed, directory fsynced. Returns its length.
fn copy_to_segment(
    fs: &dyn Filesystem,
    dir: &std::path::Path,
    first_seq: u64,
    src: &dyn WalFile,
    (from, to): (u64, u64),
) -> std::io::Result<u64> {
    let name = format::segment_name(first_seq);
    let tmp = dir.join(format!("{name}.tmp"));
    let result = (|| {
        let dst = fs.create(&tmp)?;
        dst.write_all_at(&format::encode_header(first_seq), 0)?;
        let mut buf = vec![0u8; 1024 * 1024];
        let mut off = from;
        while off < to {
            let want = ((to - off) as usize).min(buf.len());
            let n = read_full(src, &mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            dst.write_all_at(&buf[..n], HEADER_LEN as u64 + off - from)?;
            off += n as u64;
        }
        dst.sync_data()?;
        fs.rename(&tmp, &dir.join(&name))?;
        fs.sync_dir(dir)?;
        Ok(HEADER_LEN as u64 + off - from)
    })();
    if result.is_err() {
        // Free what the partial copy took; open deletes a leftover .tmp anyway.
        let _ = fs.remove(&tmp);
    }
    result
}

/// Unlinks a file; one that is already gone is what we wanted.
fn remove_file(fs: &dyn Filesystem, path: &std::path::Path) -> std::io::Result<()> {
    match fs.remove(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn all_zero(file: &dyn WalFile, from: u64, to: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = from;
    while off < to {
        let want = ((to - off) as usize).min(buf.len());
        let n = read_full(file, &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// A last segment whose 24-byte header is damaged still holds acknowledged
/// frames, and the header only repeats the magic, the version and the first
/// sequence number, which the name gives. If an intact frame of this
/// segment follows the header (searched from byte 24, resynchronising past
/// damage), the damaged header is copied to quarantine and rewritten in
/// place; the segment then goes through the last-segment recovery like any
/// other, which counts damaged frames exactly and keeps the intact ones.
/// Rewriting in place (rather than moving the file aside and copying its
/// frames back) leaves no moment at which the frames are outside `wal/`:
/// dying before the rewrite's fdatasync leaves the old header, and the next
/// open repeats this. Returns the segment's length, or `None` if no intact
/// frame follows (the caller quarantines the whole file).
fn repair_last_header(
    fs: &dyn Filesystem,
    cfg: &WalConfig,
    counters: &WalCounters,
    report: &mut RecoveryReport,
    first: u64,
    problem: &str,
    direct: &dyn WalFile,
) -> Result<Option<u64>, WalError> {
    let io = WalError::io;
    let name = format::segment_name(first);
    let path = cfg.dir.join(&name);
    let file_len = direct.len().map_err(io)?;
    let mut cursor = FrameCursor::headerless(fs.open_direct(&path).map_err(io)?);
    // Frames are at least 17 bytes, which bounds the numbers worth matching.
    let bound = first.saturating_add(file_len.saturating_sub(HEADER_LEN as u64) / 17 + 1);
    let Some(found) = cursor
        .resync(HEADER_LEN as u64, first..=bound)
        .map_err(io)?
    else {
        return Ok(None);
    };
    let mut head = [0u8; HEADER_LEN];
    let n = read_full(direct, &mut head, 0).map_err(io)?;
    let evidence = format!("{name}.bad-header");
    match quarantine_copy(
        fs,
        &cfg.quarantine_dir,
        counters,
        direct,
        (0, HEADER_LEN as u64),
        &evidence,
    ) {
        Ok(saved) => report.quarantined.push(saved),
        Err(e) => {
            // The 24 bytes are the whole evidence: the log keeps them.
            counters.quarantine_failures.fetch_add(1, Ordering::Relaxed);
            let hex: String = head[..n].iter().map(|b| format!("{b:02x}")).collect();
            tracing::error!(file = %evidence, error = %e, header_hex = %hex, "could not copy the damaged header to quarantine; its bytes are in this log line");
            report.not_quarantined.push(evidence);
        }
    }
    let file = fs.open(&path).map_err(io)?;
    file.write_all_at(&format::encode_header(first), 0)
        .map_err(io)?;
    file.sync_data().map_err(io)?;
    tracing::error!(
        segment = %name,
        %problem,
        first_intact_seq = found,
        "the last WAL segment's header was damaged; rewritten from its name, its frames are kept"
    );
    Ok(Some(file_len))
}

/// From a cursor positioned at the intact frame `start`, walks to the end of
/// the file, resynchronising past every damaged stretch, and returns the
/// highest sequence number of an intact frame (at least `start`).
fn walk_to_end(cursor: &mut FrameCursor, start: u64, file_len: u64) -> std::io::Result<u64> {
    let mut expected = start;
    loop {
        let (search_from, at) = match cursor.next_frame()? {
            Step::Frame { frame, .. } if frame.seq == expected => {
                expected += 1;
                continue;
            }
            Step::Frame { offset, .. } => (offset, offset),
            Step::End { error: None, .. } => break,
            Step::End {
                offset,
                error: Some(_),
            } => (offset + 1, offset),
        };
        let bound = expected.saturating_add(file_len.saturating_sub(at) / 17 + 1);
        match cursor.resync(search_from, expected..=bound)? {
            Some(seq) => expected = seq,
            None => break,
        }
    }
    Ok(expected.saturating_sub(1).max(start))
}
