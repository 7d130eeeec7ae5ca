//! Opening the log: what is on disk after any crash becomes a consistent
//! state again, without ever panicking and without scanning the backlog.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::format::{self, HEADER_LEN, SEGMENT_SUFFIX, TMP_SUFFIX};
use super::io::{Filesystem, WalFile};
use super::reader::{Gap, GapReason};
use super::segment::{self, read_full};
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
    /// Sequence ranges known to be lost. A segment whose header is unreadable
    /// and that was the last one has an unknown end; it is reported as
    /// `first..=first` and flagged in the log.
    pub lost: Vec<Gap>,
}

pub(super) fn open(
    cfg: WalConfig,
    fs: Arc<dyn Filesystem>,
    committed: u64,
) -> Result<(Shared, Active, RecoveryReport), WalError> {
    let io = WalError::io;
    fs.create_dir_all(&cfg.dir).map_err(io)?;
    let counters = WalCounters::default();
    let mut report = RecoveryReport::default();

    let mut firsts = Vec::new();
    for name in fs.list(&cfg.dir).map_err(io)? {
        if name.ends_with(TMP_SUFFIX) {
            // A roll died before its rename: the segment never held a record.
            fs.remove(&cfg.dir.join(&name)).map_err(io)?;
            report.removed_tmp += 1;
            tracing::info!(file = %name, "removed half-created segment");
        } else if let Some(first) = format::parse_segment_name(&name) {
            firsts.push(first);
        } else if name.ends_with(SEGMENT_SUFFIX) {
            tracing::warn!(file = %name, "ignoring a .wal file with a malformed name");
        }
    }
    firsts.sort_unstable();

    // Headers: 24 bytes per segment. A segment whose header is unreadable
    // cannot be trusted at all; it moves to quarantine whole.
    let mut sizes = BTreeMap::new();
    let mut bad_header_last = None;
    for (i, &first) in firsts.iter().enumerate() {
        let path = cfg.dir.join(format::segment_name(first));
        let file = fs.open(&path).map_err(io)?;
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
        let qname = format!("{}.bad-header", format::segment_name(first));
        fs.create_dir_all(&cfg.quarantine_dir).map_err(io)?;
        fs.rename(&path, &cfg.quarantine_dir.join(&qname))
            .map_err(io)?;
        fs.sync_dir(&cfg.quarantine_dir).map_err(io)?;
        fs.sync_dir(&cfg.dir).map_err(io)?;
        counters.quarantined_files.fetch_add(1, Ordering::Relaxed);
        tracing::error!(file = %qname, %problem, "quarantined a segment with an unreadable header");
        report.quarantined.push(qname);
        match firsts.get(i + 1) {
            Some(&next) => report.lost.push(Gap {
                first,
                last: next - 1,
                reason: GapReason::BadHeader,
            }),
            None => bad_header_last = Some(first),
        }
    }

    // Segments wholly consumed: a crash between the offset flush and the
    // unlinks of GC leaves them. Remove in ascending order (see Wal::remove_through).
    let firsts: Vec<u64> = sizes.keys().copied().collect();
    for pair in firsts.windows(2) {
        if pair[1] - 1 > committed {
            break;
        }
        fs.remove(&cfg.dir.join(format::segment_name(pair[0])))
            .map_err(io)?;
        sizes.remove(&pair[0]);
        report.removed_consumed += 1;
    }

    // The last segment is the only one that can have a torn tail.
    let mut last_seq = committed;
    let mut active = None;
    if let Some((&first, size)) = sizes.iter_mut().next_back() {
        let path = cfg.dir.join(format::segment_name(first));
        let scan = match segment::scan(fs.open(&path).map_err(io)?).map_err(io)? {
            Ok(scan) => scan,
            // The header was good a moment ago; only a concurrent writer
            // could change that, and the data-dir lock rules that out.
            Err(e) => return Err(WalError::io(std::io::Error::other(e))),
        };
        let file = fs.open(&path).map_err(io)?;
        if scan.valid_len < scan.file_len {
            let cut = scan.file_len - scan.valid_len;
            let why = scan
                .stop
                .as_ref()
                .map_or_else(|| "trailing bytes".to_string(), |s| s.to_string());
            if !all_zero(file.as_ref(), scan.valid_len, scan.file_len).map_err(io)? {
                let qname = format!("{}.tail-{}", format::segment_name(first), scan.valid_len);
                quarantine_copy(
                    fs.as_ref(),
                    &cfg.quarantine_dir,
                    &counters,
                    file.as_ref(),
                    (scan.valid_len, scan.file_len),
                    &qname,
                )
                .map_err(io)?;
                report.quarantined.push(qname);
            }
            // Intact frames after the bad one mean damage, not a torn write:
            // count them as lost so the loss is exact, not just "bytes cut".
            if let Some(last) = intact_after(fs.as_ref(), &path, &scan).map_err(io)? {
                let first_lost = first + scan.records;
                report.lost.push(Gap {
                    first: first_lost,
                    last,
                    reason: GapReason::Corrupt,
                });
            }
            // Order: the evidence is durable in quarantine, then the cut is
            // made durable. Dying in between leaves the tail to cut again.
            file.set_len(scan.valid_len).map_err(io)?;
            file.sync_data().map_err(io)?;
            *size = scan.valid_len;
            report.truncated_bytes = cut;
            counters.truncated_bytes.fetch_add(cut, Ordering::Relaxed);
            tracing::warn!(
                segment = %format::segment_name(first),
                offset = scan.valid_len,
                bytes = cut,
                reason = %why,
                "cut the torn tail of the last WAL segment"
            );
        }
        last_seq = last_seq.max(scan.last_seq().unwrap_or(first.saturating_sub(1)));
        let next = last_seq + 1;
        if scan.records == 0 && first != next {
            // Empty, and the log must continue at another number.
            fs.remove(&path).map_err(io)?;
            sizes.remove(&first);
        } else if scan.last_seq().map_or(first, |l| l + 1) == next {
            active = Some(Active {
                file,
                first_seq: first,
                len: scan.valid_len,
            });
        }
    }
    if let Some(first) = bad_header_last {
        tracing::error!(
            first_seq = first,
            "the last segment's header was unreadable: records from this sequence number on are lost, count unknown"
        );
        report.lost.push(Gap {
            first,
            last: first,
            reason: GapReason::BadHeader,
        });
        last_seq = last_seq.max(first.saturating_sub(1));
    }
    let next_seq = last_seq + 1;
    let active = match active {
        Some(a) => a,
        None => {
            let file = create_segment(fs.as_ref(), &cfg.dir, next_seq).map_err(io)?;
            sizes.insert(next_seq, HEADER_LEN as u64);
            counters.segments_created.fetch_add(1, Ordering::Relaxed);
            Active {
                file,
                first_seq: next_seq,
                len: HEADER_LEN as u64,
            }
        }
    };

    // Records between the committed offset and the first segment are gone.
    if let Some(&first) = sizes.keys().next() {
        if first > committed + 1 {
            report.lost.push(Gap {
                first: committed + 1,
                last: first - 1,
                reason: GapReason::Missing,
            });
        }
    }

    report.segments = sizes.len();
    report.next_seq = next_seq;
    let disk_bytes = sizes.values().sum();
    let (durable, _) = watch::channel(Durable {
        next_seq,
        active_first: active.first_seq,
        active_len: active.len,
    });
    let shared = Shared {
        observer: std::sync::OnceLock::new(),
        cfg,
        fs,
        segments: Mutex::new(sizes),
        disk_bytes: AtomicU64::new(disk_bytes),
        durable,
        failed: Mutex::new(None),
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

/// When the walk of the last segment stopped at a frame with a bad checksum
/// whose length field is plausible, looks past it: the last sequence number of
/// the intact, contiguous frames that follow, if any. A torn write leaves no
/// such frames (except after page reordering on power loss, where they were
/// never acknowledged; reporting them is the conservative error).
fn intact_after(
    fs: &dyn Filesystem,
    path: &std::path::Path,
    scan: &segment::SegmentScan,
) -> std::io::Result<Option<u64>> {
    use super::format::{FrameError, FRAME_HEADER_LEN};
    use super::segment::{FrameCursor, ScanStop, Step};
    if scan.stop != Some(ScanStop::Frame(FrameError::BadCrc)) {
        return Ok(None);
    }
    let file = fs.open(path)?;
    let mut head = [0u8; FRAME_HEADER_LEN];
    if read_full(file.as_ref(), &mut head, scan.valid_len)? < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as u64;
    let bad_seq = scan.header.first_seq + scan.records;
    let Ok((_, mut cursor)) = FrameCursor::open(file)? else {
        return Ok(None);
    };
    cursor.seek(scan.valid_len + FRAME_HEADER_LEN as u64 + len);
    let mut last = None;
    let mut expected = bad_seq + 1;
    while let Step::Frame { frame, .. } = cursor.next_frame()? {
        if frame.seq != expected {
            break;
        }
        last = Some(frame.seq);
        expected += 1;
    }
    Ok(last)
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
