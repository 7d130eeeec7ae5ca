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
use super::segment::{self, FrameCursor, SegmentScan, Step};
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
    /// Bytes after the last intact frame (0 when intact frames follow the
    /// damage up to the end of the file).
    pub trailing_bytes: u64,
    /// Byte offset in the file where the walk stopped (the damage), when
    /// there is a problem.
    pub problem_at: Option<u64>,
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
    let mut walk = Walk {
        fs,
        dir,
        report: VerifyReport {
            segments: Vec::new(),
            committed,
            first_seq: None,
            last_seq: None,
            records: 0,
            bytes: 0,
            lost: Vec::new(),
            torn_tail_bytes: 0,
        },
        expect: committed + 1,
    };
    for (i, &first) in firsts.iter().enumerate() {
        walk.segment(first, firsts.get(i + 1).copied())?;
    }
    Ok(walk.report)
}

/// The state of `verify` between segments.
struct Walk<'a> {
    fs: &'a dyn Filesystem,
    dir: &'a Path,
    report: VerifyReport,
    /// Next sequence number expected if nothing is missing.
    expect: u64,
}

impl Walk<'_> {
    /// Records `first..=last` as lost, except what is already committed.
    fn lose(&mut self, first: u64, last: u64, reason: GapReason) {
        let first = first.max(self.report.committed + 1);
        if first <= last {
            self.report.lost.push(Gap {
                first,
                last,
                reason,
            });
        }
    }

    /// Checks the segment starting at `first`; `next_first` is the next
    /// segment's, `None` for the last one.
    fn segment(&mut self, first: u64, next_first: Option<u64>) -> io::Result<()> {
        let name = format::segment_name(first);
        let file = self.fs.open(&self.dir.join(&name))?;
        let bytes = file.len()?;
        self.report.bytes += bytes;
        if first > self.expect {
            self.lose(self.expect, first - 1, GapReason::Missing);
        }
        let mut seg = SegmentReport {
            name,
            first_seq: first,
            bytes,
            records: 0,
            last_seq: None,
            problem: None,
            trailing_bytes: 0,
            problem_at: None,
        };
        match segment::scan(file)? {
            Err(e) => {
                seg.problem = Some(format!("header: {e}"));
                // Without a header nothing in the file can be trusted: the
                // whole range up to the next segment is lost.
                self.lose(
                    first,
                    next_first.map_or(first, |n| n - 1),
                    GapReason::BadHeader,
                );
                self.expect = next_first.unwrap_or(first + 1);
            }
            Ok(scan) => {
                let end = self.scanned(&mut seg, &scan, next_first)?;
                if next_first.is_none() {
                    self.report.torn_tail_bytes = seg.trailing_bytes;
                }
                self.expect = next_first.unwrap_or(end);
            }
        }
        self.report.segments.push(seg);
        Ok(())
    }

    /// Accounts a segment with a valid header; returns the sequence number
    /// after its last readable record.
    fn scanned(
        &mut self,
        seg: &mut SegmentReport,
        scan: &SegmentScan,
        next_first: Option<u64>,
    ) -> io::Result<u64> {
        let first = seg.first_seq;
        seg.records = scan.records;
        seg.last_seq = scan.last_seq();
        seg.trailing_bytes = scan.file_len - scan.valid_len;
        seg.problem = scan.stop.as_ref().map(|s| s.to_string());
        seg.problem_at = scan.stop.as_ref().map(|_| scan.valid_len);
        self.report.records += scan.records;
        if scan.records > 0 {
            self.report.first_seq.get_or_insert(first);
            self.report.last_seq = scan.last_seq();
        }
        let mut end = first + scan.records;
        if next_first.is_none() && scan.stop.is_some() {
            // As recovery does: damage followed by intact frames is a loss
            // of exactly the damaged range, not a torn tail.
            let file = self.fs.open(&self.dir.join(&seg.name))?;
            let after = past_damage(file, scan.valid_len, end)?;
            for g in &after.gaps {
                self.lose(g.first, g.last, GapReason::Corrupt);
            }
            seg.records += after.records;
            self.report.records += after.records;
            if after.records > 0 {
                self.report.first_seq.get_or_insert(first);
                seg.last_seq = Some(after.next - 1);
                self.report.last_seq = seg.last_seq;
            }
            seg.trailing_bytes = scan.file_len - after.valid_end.max(scan.valid_len);
            end = after.next;
        }
        if let Some(n) = next_first.filter(|&n| end < n) {
            let reason = if scan.stop.is_some() {
                GapReason::Corrupt
            } else {
                GapReason::Missing
            };
            self.lose(end, n - 1, reason);
        }
        Ok(end)
    }
}

/// What lies past the first damage of a last segment.
struct PastDamage {
    /// Damaged ranges with intact frames after them.
    gaps: Vec<Gap>,
    /// Intact frames found after the first damage.
    records: u64,
    /// The sequence number after the last intact frame.
    next: u64,
    /// Offset just past the last intact frame (0 if none).
    valid_end: u64,
}

/// Walks a last segment past damage at `bad_at` (where `expected` was due),
/// resynchronising on the next intact frame each time, as recovery does.
fn past_damage(
    file: Box<dyn super::io::WalFile>,
    bad_at: u64,
    expected: u64,
) -> io::Result<PastDamage> {
    let file_len = file.len()?;
    let mut out = PastDamage {
        gaps: Vec::new(),
        records: 0,
        next: expected,
        valid_end: 0,
    };
    let Ok((_, mut cursor)) = FrameCursor::open(file)? else {
        return Ok(out);
    };
    let mut at = bad_at;
    loop {
        let max_seq = out.next.saturating_add((file_len - at) / 17 + 1);
        let Some(resumed) = cursor.resync(at, out.next + 1..=max_seq)? else {
            return Ok(out);
        };
        out.gaps.push(Gap {
            first: out.next,
            last: resumed - 1,
            reason: GapReason::Corrupt,
        });
        out.next = resumed;
        loop {
            match cursor.next_frame()? {
                Step::Frame { frame, .. } if frame.seq == out.next => {
                    out.next += 1;
                    out.records += 1;
                    out.valid_end = cursor.position();
                }
                Step::Frame { offset, .. } => {
                    at = offset;
                    break;
                }
                Step::End { error: None, .. } => return Ok(out),
                Step::End { offset, .. } => {
                    at = offset + 1;
                    break;
                }
            }
        }
    }
}

/// Calls `each` for every readable record from `from_seq` on, in order, until
/// it breaks, and `gap` for each unreadable range. Read-only; stops at the
/// first bad frame of each sealed segment, and in the last segment goes on
/// after damage from the next intact frame, as recovery does.
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
        let file_len = if next_first.is_none() {
            fs.open(&dir.join(format::segment_name(first)))?.len()?
        } else {
            0
        };
        loop {
            let bad_at = match cursor.next_frame()? {
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
                    continue;
                }
                Step::Frame { offset, .. } => offset,
                Step::End { error: None, .. } => break,
                Step::End { offset, .. } => offset + 1,
            };
            if next_first.is_some() {
                break;
            }
            let max_seq = expect.saturating_add(file_len.saturating_sub(bad_at) / 17 + 1);
            let Some(resumed) = cursor.resync(bad_at, expect + 1..=max_seq)? else {
                break;
            };
            if resumed > from_seq {
                gap(Gap {
                    first: expect.max(from_seq),
                    last: resumed - 1,
                    reason: GapReason::Corrupt,
                });
            }
            expect = resumed;
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

/// A stored value as the tools print it: the stored bytes themselves when
/// they are JSON (never re-serialized: `1e5` stays `1e5`, `\u00e9` stays an
/// escape), else a JSON string of the text (invalid UTF-8 replaced).
pub fn value_json(bytes: &[u8]) -> Box<serde_json::value::RawValue> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| serde_json::value::RawValue::from_string(t.to_string()).ok())
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(bytes);
            serde_json::value::to_raw_value(&text).unwrap_or_else(|_| {
                serde_json::value::RawValue::from_string("null".into()).expect("valid JSON")
            })
        })
}

/// A header value as the tools print it: its text when it is UTF-8, else
/// `{"base64": "..."}` (a binary header such as the internal idempotency
/// entry must not print as replacement characters).
pub fn header_json(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::Value::String(text.to_string()),
        Err(_) => {
            use base64::Engine;
            serde_json::json!({"base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
        }
    }
}

#[cfg(test)]
mod print_tests {
    use super::*;

    #[test]
    fn values_print_as_stored_and_binary_headers_as_base64() {
        let stored = br#"{"n":1e5,"s":"caf\u00e9"}"#;
        assert_eq!(value_json(stored).get(), r#"{"n":1e5,"s":"caf\u00e9"}"#);
        assert_eq!(value_json(b"not json").get(), r#""not json""#);
        assert_eq!(value_json(b"\xff{").get(), "\"\u{fffd}{\"");
        assert_eq!(header_json(b"abc"), serde_json::json!("abc"));
        assert_eq!(
            header_json(&[1, 0xff]),
            serde_json::json!({"base64": "Af8="})
        );
    }
}
