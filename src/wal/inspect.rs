//! Read-only inspection of a WAL directory, for `sluice wal verify|dump|stats`.
//! Unlike [`super::Wal::open`], nothing here changes a byte on disk, so it is
//! safe to point at the data directory of a stopped daemon after an incident.

use std::io;
use std::ops::ControlFlow;
use std::path::Path;

use serde::Serialize;

use super::format;
use super::io::Filesystem;
use super::record::Record;
use super::segment::{self, FrameCursor, Step};
use super::{Gap, GapReason};

/// One segment as found on disk.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentReport {
    pub name: String,
    pub first_seq: u64,
    pub bytes: u64,
    /// Records in the valid, contiguous prefix.
    pub records: u64,
    pub last_seq: Option<u64>,
    /// Why the walk stopped before the end of the file, if it did.
    pub problem: Option<String>,
    /// Bytes after the valid prefix.
    pub trailing_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub segments: Vec<SegmentReport>,
    pub committed: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub records: u64,
    pub bytes: u64,
    /// Ranges above the committed offset that cannot be read.
    pub lost: Vec<Gap>,
    /// Bytes after the last good frame of the last segment: a torn tail that
    /// the next open cuts. Normal after a crash; not a loss by itself.
    pub torn_tail_bytes: u64,
}

impl VerifyReport {
    /// True when records that were acknowledged are unreadable.
    pub fn damaged(&self) -> bool {
        !self.lost.is_empty()
    }
}

/// First sequence numbers of the segments in `dir`, ascending.
fn segment_firsts(fs: &dyn Filesystem, dir: &Path) -> io::Result<Vec<u64>> {
    let mut firsts: Vec<u64> = fs
        .list(dir)?
        .iter()
        .filter_map(|n| format::parse_segment_name(n))
        .collect();
    firsts.sort_unstable();
    Ok(firsts)
}

/// Walks every segment in `dir`, checking every frame.
pub fn verify(fs: &dyn Filesystem, dir: &Path, committed: u64) -> io::Result<VerifyReport> {
    let firsts = segment_firsts(fs, dir)?;
    let mut report = VerifyReport {
        segments: Vec::new(),
        committed,
        first_seq: None,
        last_seq: None,
        records: 0,
        bytes: 0,
        lost: Vec::new(),
        torn_tail_bytes: 0,
    };
    // Next sequence number expected if nothing is missing.
    let mut expect = committed + 1;
    let lose = |report: &mut VerifyReport, first: u64, last: u64, reason| {
        let first = first.max(committed + 1);
        if first <= last {
            report.lost.push(Gap {
                first,
                last,
                reason,
            });
        }
    };
    for (i, &first) in firsts.iter().enumerate() {
        let name = format::segment_name(first);
        let file = fs.open(&dir.join(&name))?;
        let bytes = file.len()?;
        report.bytes += bytes;
        let next_first = firsts.get(i + 1).copied();
        let is_last = next_first.is_none();
        if first > expect {
            lose(&mut report, expect, first - 1, GapReason::Missing);
        }
        let mut seg = SegmentReport {
            name,
            first_seq: first,
            bytes,
            records: 0,
            last_seq: None,
            problem: None,
            trailing_bytes: 0,
        };
        match segment::scan(file)? {
            Err(e) => {
                seg.problem = Some(format!("header: {e}"));
                if let Some(n) = next_first {
                    lose(&mut report, first, n - 1, GapReason::BadHeader);
                } else {
                    lose(&mut report, first, first, GapReason::BadHeader);
                }
                expect = next_first.unwrap_or(first + 1);
            }
            Ok(scan) => {
                seg.records = scan.records;
                seg.last_seq = scan.last_seq();
                seg.trailing_bytes = scan.file_len - scan.valid_len;
                seg.problem = scan.stop.as_ref().map(|s| s.to_string());
                report.records += scan.records;
                if scan.records > 0 {
                    report.first_seq.get_or_insert(first);
                    report.last_seq = scan.last_seq();
                }
                let end = first + scan.records;
                match next_first {
                    Some(n) if end < n => {
                        let reason = if scan.stop.is_some() {
                            GapReason::Corrupt
                        } else {
                            GapReason::Missing
                        };
                        lose(&mut report, end, n - 1, reason);
                    }
                    _ => {}
                }
                if is_last {
                    report.torn_tail_bytes = seg.trailing_bytes;
                }
                expect = next_first.unwrap_or(end);
            }
        }
        report.segments.push(seg);
    }
    Ok(report)
}

/// Calls `each` for every readable record from `from_seq` on, in order, until
/// it breaks, and `gap` for each unreadable range. Read-only; stops at the
/// first bad frame of each segment.
pub fn for_each_record(
    fs: &dyn Filesystem,
    dir: &Path,
    from_seq: u64,
    mut each: impl FnMut(u64, Record) -> io::Result<ControlFlow<()>>,
    mut gap: impl FnMut(Gap),
) -> io::Result<()> {
    let firsts = segment_firsts(fs, dir)?;
    for (i, &first) in firsts.iter().enumerate() {
        let next_first = firsts.get(i + 1).copied();
        if next_first.is_some_and(|n| n <= from_seq) {
            continue;
        }
        let file = fs.open(&dir.join(format::segment_name(first)))?;
        let Ok((_, mut cursor)) = FrameCursor::open(file)? else {
            if let Some(n) = next_first {
                gap(Gap {
                    first,
                    last: n - 1,
                    reason: GapReason::BadHeader,
                });
            }
            continue;
        };
        let mut expect = first;
        loop {
            match cursor.next_frame()? {
                Step::Frame { frame, .. } if frame.seq == expect => {
                    expect += 1;
                    if frame.seq < from_seq {
                        continue;
                    }
                    match Record::decode(frame.payload) {
                        Ok(r) => {
                            if each(frame.seq, r)?.is_break() {
                                return Ok(());
                            }
                        }
                        Err(_) => gap(Gap {
                            first: frame.seq,
                            last: frame.seq,
                            reason: GapReason::Undecodable,
                        }),
                    }
                }
                _ => break,
            }
        }
        if let Some(n) = next_first {
            if expect < n {
                gap(Gap {
                    first: expect.max(from_seq),
                    last: n - 1,
                    reason: GapReason::Corrupt,
                });
            }
        }
    }
    Ok(())
}
