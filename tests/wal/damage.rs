//! Damages real segment files on disk and checks exactly what recovery and
//! replay keep, quarantine and report.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use sluice::wal::{format, Gap, GapReason, WalConfig};

use super::{open_std, read_all, rec, segment_files, small_cfg};

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    cfg: WalConfig,
    expected: Vec<(u64, String)>,
    /// (first_seq, path) of each segment, ascending.
    segments: Vec<(u64, PathBuf)>,
    frame_len: u64,
}

fn tag(i: u64) -> String {
    format!("{i:0>60}")
}

/// 60 equal-sized records in 1 KiB segments (several records per segment).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let cfg = small_cfg(&data);
    let mut expected = Vec::new();
    {
        let wal = open_std(&cfg, 0).0;
        for i in 1..=60 {
            let r = wal.append_blocking(vec![rec(&tag(i))]).unwrap();
            expected.push((r.first, tag(i)));
        }
    }
    let segments = segment_files(&data)
        .into_iter()
        .map(|n| {
            (
                format::parse_segment_name(&n).unwrap(),
                data.join("wal").join(n),
            )
        })
        .collect::<Vec<_>>();
    assert!(segments.len() >= 5);
    let frame_len = format::frame_len(rec(&tag(1)).len()) as u64;
    Fixture {
        _dir: dir,
        data,
        cfg,
        expected,
        segments,
        frame_len,
    }
}

fn without(expected: &[(u64, String)], first: u64, last: u64) -> Vec<(u64, String)> {
    expected
        .iter()
        .filter(|(s, _)| *s < first || *s > last)
        .cloned()
        .collect()
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

fn quarantine(data: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(data.join("quarantine")) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// The one file in quarantine, which must be evidence saved under `base`
/// (with the suffix that keeps it from replacing earlier evidence).
fn only_evidence(data: &Path, base: &str) -> String {
    let q = quarantine(data);
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(q[0].starts_with(&format!("{base}.")), "{q:?} vs {base}");
    q[0].clone()
}

#[test]
fn bit_flip_in_a_sealed_segment_loses_exactly_the_rest_of_that_segment() {
    let f = fixture();
    let (first, path) = &f.segments[1];
    let next = f.segments[2].0;
    // Inside the payload of the segment's third frame.
    let off = format::HEADER_LEN as u64 + 2 * f.frame_len + 30;
    flip(path, off);
    let (wal, report) = open_std(&f.cfg, 0);
    assert!(
        report.lost.is_empty(),
        "sealed segments are verified lazily"
    );
    let (recs, gaps) = read_all(&wal, 1);
    let lost = Gap {
        first: first + 2,
        last: next - 1,
        reason: GapReason::Corrupt,
    };
    assert_eq!(gaps, vec![lost]);
    assert_eq!(recs, without(&f.expected, lost.first, lost.last));
    assert_eq!(
        wal.counters().lost_records.load(Ordering::Relaxed),
        lost.len()
    );
    let name = format::segment_name(*first);
    let bad = format::HEADER_LEN as u64 + 2 * f.frame_len;
    let saved = only_evidence(&f.data, &format!("{name}.corrupt-{bad}"));
    // The quarantined copy is the damaged file, byte for byte.
    assert_eq!(
        std::fs::read(f.data.join("quarantine").join(saved)).unwrap(),
        std::fs::read(path).unwrap()
    );
}

#[test]
fn bit_flip_in_the_last_segment_loses_that_frame_and_recovers_the_frames_after_it() {
    let f = fixture();
    let (first, path) = f.segments.last().unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    let records = (len - format::HEADER_LEN as u64) / f.frame_len;
    assert!(records >= 3, "fixture needs 3 records in the last segment");
    flip(path, format::HEADER_LEN as u64 + f.frame_len + 40);
    let (wal, report) = open_std(&f.cfg, 0);
    let cut_at = format::HEADER_LEN as u64 + f.frame_len;
    // Only the damaged frame is gone; the frames after it moved to their
    // own segment and are not counted as truncated.
    assert_eq!(report.truncated_bytes, f.frame_len);
    assert!(len - cut_at > f.frame_len);
    let lost = Gap {
        first: first + 1,
        last: first + 1,
        reason: GapReason::Corrupt,
    };
    assert_eq!(report.lost, vec![lost]);
    assert_eq!(std::fs::metadata(path).unwrap().len(), cut_at);
    let name = format::segment_name(*first);
    let saved = only_evidence(&f.data, &format!("{name}.corrupt-{cut_at}"));
    assert_eq!(
        std::fs::metadata(f.data.join("quarantine").join(saved))
            .unwrap()
            .len(),
        f.frame_len,
        "exactly the damaged frame is kept as evidence"
    );
    let (recs, gaps) = read_all(&wal, 1);
    // The reader finds the segment ending early (the damage was cut).
    let ranges: Vec<_> = gaps.iter().map(|g| (g.first, g.last)).collect();
    assert_eq!(
        ranges,
        vec![(lost.first, lost.last)],
        "replay skips the range"
    );
    assert_eq!(recs, without(&f.expected, lost.first, lost.last));
    assert_eq!(wal.counters().lost_records.load(Ordering::Relaxed), 1);
    assert_eq!(wal.append_blocking(vec![rec("new")]).unwrap().first, 61);
}

/// 100 acknowledged records in one segment, then frame 10's length field is
/// overwritten: with a length past the end of the file, out of bounds, or 0.
/// Only record 10 is lost, counted exactly; 11..=100 are read back.
#[test]
fn a_damaged_length_in_the_last_segment_loses_exactly_that_frame() {
    for bad_len in [0x00F0_0000u32, u32::MAX, 0] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path());
        cfg.min_free_bytes = 0;
        let mut expected = Vec::new();
        {
            let wal = open_std(&cfg, 0).0;
            for i in 1..=100u64 {
                let r = wal.append_blocking(vec![rec(&tag(i))]).unwrap();
                expected.push((r.first, tag(i)));
            }
        }
        let names = segment_files(dir.path());
        assert_eq!(names.len(), 1, "one segment");
        let path = dir.path().join("wal").join(&names[0]);
        let frame_len = format::frame_len(rec(&tag(1)).len()) as u64;
        let at = format::HEADER_LEN as u64 + 9 * frame_len;
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at as usize + 4..at as usize + 8].copy_from_slice(&bad_len.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();

        let (wal, report) = open_std(&cfg, 0);
        let lost = Gap {
            first: 10,
            last: 10,
            reason: GapReason::Corrupt,
        };
        assert_eq!(report.lost, vec![lost], "length {bad_len:#x}");
        assert_eq!(report.next_seq, 101);
        let (recs, gaps) = read_all(&wal, 1);
        let ranges: Vec<_> = gaps.iter().map(|g| (g.first, g.last)).collect();
        assert_eq!(ranges, vec![(10, 10)]);
        assert_eq!(recs, without(&expected, 10, 10), "length {bad_len:#x}");
        assert_eq!(wal.counters().lost_records.load(Ordering::Relaxed), 1);
        only_evidence(dir.path(), &format!("{}.corrupt-{at}", names[0]));
        assert_eq!(wal.append_blocking(vec![rec("new")]).unwrap().first, 101);
    }
}

#[test]
fn a_bad_header_segment_wholly_below_the_committed_offset_is_not_a_loss() {
    let f = fixture();
    flip(&f.segments[1].1, 0);
    let committed = f.segments[2].0 - 1;
    let (wal, report) = open_std(&f.cfg, committed);
    assert!(report.lost.is_empty(), "{report:?}");
    assert_eq!(wal.counters().lost_records.load(Ordering::Relaxed), 0);
    let (recs, gaps) = read_all(&wal, committed + 1);
    assert!(gaps.is_empty());
    assert_eq!(recs, f.expected[committed as usize..].to_vec());
}

#[test]
fn truncation_mid_frame_is_a_torn_tail_with_no_loss_reported() {
    let f = fixture();
    let (_, path) = f.segments.last().unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let (wal, report) = open_std(&f.cfg, 0);
    assert_eq!(report.truncated_bytes, f.frame_len - 5);
    assert!(report.lost.is_empty(), "a torn tail was never acknowledged");
    let (recs, gaps) = read_all(&wal, 1);
    assert!(gaps.is_empty());
    assert_eq!(recs, f.expected[..59].to_vec());
    assert_eq!(quarantine(&f.data).len(), 1, "the partial frame is kept");
}

#[test]
fn zeroed_tail_is_cut_silently_and_nothing_is_lost() {
    let f = fixture();
    let (_, path) = f.segments.last().unwrap();
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(&[0u8; 4096])
        .unwrap();
    let (wal, report) = open_std(&f.cfg, 0);
    assert_eq!(report.truncated_bytes, 4096);
    assert!(report.lost.is_empty());
    assert!(quarantine(&f.data).is_empty(), "zeros are not evidence");
    assert_eq!(read_all(&wal, 1).0, f.expected);
}

fn assert_whole_segment_quarantined(f: &Fixture, index: usize) {
    let (first, _) = f.segments[index];
    let next = f.segments[index + 1].0;
    let (wal, report) = open_std(&f.cfg, 0);
    let lost = Gap {
        first,
        last: next - 1,
        reason: GapReason::BadHeader,
    };
    assert_eq!(report.lost, vec![lost]);
    let qname = only_evidence(
        &f.data,
        &format!("{}.bad-header", format::segment_name(first)),
    );
    assert_eq!(report.quarantined, vec![qname]);
    let (recs, gaps) = read_all(&wal, 1);
    assert_eq!(recs, without(&f.expected, lost.first, lost.last));
    assert_eq!(gaps.len(), 1, "replay skips the range");
    assert_eq!(
        wal.counters().lost_records.load(Ordering::Relaxed),
        lost.len(),
        "reported at open and met again in replay, counted once"
    );
}

#[test]
fn garbage_file_in_place_of_a_segment_is_quarantined_whole() {
    let f = fixture();
    let garbage: Vec<u8> = (0..3000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&f.segments[2].1, garbage).unwrap();
    assert_whole_segment_quarantined(&f, 2);
}

#[test]
fn wrong_magic_is_quarantined_whole() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.segments[1].1).unwrap();
    bytes[..8].copy_from_slice(b"NOTSLUIC");
    std::fs::write(&f.segments[1].1, bytes).unwrap();
    assert_whole_segment_quarantined(&f, 1);
}

#[test]
fn unknown_format_version_is_quarantined_whole() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.segments[1].1).unwrap();
    // The first version this build does not read (2 was unknown before
    // format 2 existed).
    let unknown = sluice::wal::format::VERSION + 1;
    bytes[8..12].copy_from_slice(&unknown.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..20]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&f.segments[1].1, bytes).unwrap();
    assert_whole_segment_quarantined(&f, 1);
}

#[test]
fn missing_middle_segment_is_an_exact_gap() {
    let f = fixture();
    std::fs::remove_file(&f.segments[2].1).unwrap();
    let (wal, report) = open_std(&f.cfg, 0);
    assert!(report.lost.is_empty(), "found by replay, not by open");
    let (recs, gaps) = read_all(&wal, 1);
    let lost = Gap {
        first: f.segments[2].0,
        last: f.segments[3].0 - 1,
        reason: GapReason::Missing,
    };
    assert_eq!(gaps, vec![lost]);
    assert_eq!(recs, without(&f.expected, lost.first, lost.last));
    assert!(quarantine(&f.data).is_empty());
}

#[test]
fn missing_first_segments_below_committed_are_not_a_loss_but_above_are() {
    let f = fixture();
    std::fs::remove_file(&f.segments[0].1).unwrap();
    std::fs::remove_file(&f.segments[1].1).unwrap();
    let committed = f.segments[2].0 - 1;
    let (wal, report) = open_std(&f.cfg, committed);
    assert!(report.lost.is_empty());
    let (recs, gaps) = read_all(&wal, committed + 1);
    assert!(gaps.is_empty());
    assert_eq!(recs, f.expected[committed as usize..].to_vec());
    drop(wal);
    // With an older committed offset, the missing records are a loss.
    let (_, report) = open_std(&f.cfg, 3);
    assert_eq!(
        report.lost,
        vec![Gap {
            first: 4,
            last: committed,
            reason: GapReason::Missing
        }]
    );
}

#[test]
fn junk_after_the_last_frame_of_a_sealed_segment_loses_nothing() {
    let f = fixture();
    OpenOptions::new()
        .append(true)
        .open(&f.segments[1].1)
        .unwrap()
        .write_all(b"junk that is not a frame")
        .unwrap();
    let (wal, _) = open_std(&f.cfg, 0);
    let (recs, gaps) = read_all(&wal, 1);
    assert!(gaps.is_empty());
    assert_eq!(recs, f.expected);
}

/// 100 acknowledged records in one segment whose header then takes damage,
/// alone or with one damaged frame. The header holds nothing the name does
/// not (magic, version, first sequence number): every intact frame is kept,
/// exactly the damaged one is counted, and no number is handed out again.
#[test]
fn a_damaged_header_of_the_last_segment_keeps_every_intact_frame() {
    // (frame whose payload is damaged too, expected loss)
    for (frame, lost) in [(None, None), (Some(1u64), Some(1u64)), (Some(50), Some(50))] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path());
        cfg.min_free_bytes = 0;
        let mut expected = Vec::new();
        {
            let wal = open_std(&cfg, 0).0;
            for i in 1..=100u64 {
                let r = wal.append_blocking(vec![rec(&tag(i))]).unwrap();
                expected.push((r.first, tag(i)));
            }
        }
        let names = segment_files(dir.path());
        assert_eq!(names.len(), 1, "one segment");
        let path = dir.path().join("wal").join(&names[0]);
        let frame_len = format::frame_len(rec(&tag(1)).len()) as u64;
        flip(&path, 3);
        if let Some(n) = frame {
            flip(&path, format::HEADER_LEN as u64 + (n - 1) * frame_len + 40);
        }
        let original = std::fs::read(&path).unwrap();

        let (wal, report) = open_std(&cfg, 0);
        let want: Vec<(u64, u64)> = lost.map(|n| (n, n)).into_iter().collect();
        let got: Vec<(u64, u64)> = report.lost.iter().map(|g| (g.first, g.last)).collect();
        assert_eq!(got, want, "damaged frame {frame:?}: {report:?}");
        assert_eq!(report.next_seq, 101, "damaged frame {frame:?}");
        let (recs, gaps) = read_all(&wal, 1);
        let ranges: Vec<_> = gaps.iter().map(|g| (g.first, g.last)).collect();
        assert_eq!(ranges, want, "damaged frame {frame:?}");
        let kept = match lost {
            Some(n) => without(&expected, n, n),
            None => expected.clone(),
        };
        assert_eq!(recs, kept, "damaged frame {frame:?}");
        assert_eq!(
            wal.counters().lost_records.load(Ordering::Relaxed),
            want.len() as u64
        );
        // The damaged header is kept as evidence, byte for byte (damaged
        // frames have their own evidence file).
        let q = quarantine(dir.path());
        let evidence = q
            .iter()
            .find(|n| n.starts_with(&format!("{}.bad-header.", names[0])))
            .unwrap_or_else(|| panic!("{q:?}"));
        assert_eq!(
            std::fs::read(dir.path().join("quarantine").join(evidence)).unwrap(),
            original[..format::HEADER_LEN]
        );
        assert_eq!(wal.append_blocking(vec![rec("new")]).unwrap().first, 101);
    }
}

/// If the damaged header of the last segment cannot be copied to quarantine,
/// the segment must still not be replaced by a new segment of the same name
/// (that destroyed the acknowledged frames): its frames stay, byte for byte.
#[test]
fn a_bad_header_last_segment_that_cannot_be_quarantined_is_not_renamed_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WalConfig::new(dir.path());
    cfg.min_free_bytes = 0;
    {
        let wal = open_std(&cfg, 0).0;
        for i in 1..=20u64 {
            wal.append_blocking(vec![rec(&tag(i))]).unwrap();
        }
    }
    let names = segment_files(dir.path());
    let path = dir.path().join("wal").join(&names[0]);
    flip(&path, 3);
    let original = std::fs::read(&path).unwrap();
    // A plain file where quarantine/ should be: the move fails.
    std::fs::write(dir.path().join("quarantine"), b"in the way").unwrap();
    let (wal, report) = open_std(&cfg, 0);
    assert_eq!(report.next_seq, 21, "{report:?}");
    assert!(report.lost.is_empty(), "{report:?}");
    assert_eq!(report.not_quarantined.len(), 1, "{report:?}");
    assert_eq!(wal.append_blocking(vec![rec("new")]).unwrap().first, 21);
    assert_eq!(read_all(&wal, 1).0.len(), 21);
    let now = std::fs::read(&path).unwrap();
    assert_eq!(
        now[format::HEADER_LEN..],
        original[format::HEADER_LEN..],
        "every frame is still there"
    );
}

/// Evidence of an earlier incident with the same file name is not replaced.
#[test]
fn quarantine_never_overwrites_earlier_evidence() {
    let f = fixture();
    let (first, path) = f.segments.last().unwrap();
    let name = format::segment_name(*first);
    let cut_at = format::HEADER_LEN as u64 + f.frame_len;
    let earlier = f.data.join("quarantine");
    std::fs::create_dir_all(&earlier).unwrap();
    let old_name = format!("{name}.corrupt-{cut_at}");
    std::fs::write(earlier.join(&old_name), b"earlier incident").unwrap();
    flip(path, format::HEADER_LEN as u64 + f.frame_len + 40);
    let (_wal, report) = open_std(&f.cfg, 0);
    assert_eq!(report.lost.len(), 1);
    assert_eq!(
        std::fs::read(earlier.join(&old_name)).unwrap(),
        b"earlier incident"
    );
    let q = quarantine(&f.data);
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(q.iter().all(|n| n.starts_with(&old_name)), "{q:?}");
}

/// The last segment is garbage from its first byte: nothing intact to keep.
/// It is quarantined whole, its first number is reported lost (count
/// unknown) and is not handed out again: an acknowledged record had it.
#[test]
fn a_garbage_last_segment_is_quarantined_whole_and_its_first_number_not_reused() {
    let f = fixture();
    let (first, path) = f.segments.last().unwrap();
    let garbage: Vec<u8> = (0..3000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(path, garbage).unwrap();
    let (wal, report) = open_std(&f.cfg, 0);
    let got: Vec<_> = report.lost.iter().map(|g| (g.first, g.last)).collect();
    assert_eq!(got, vec![(*first, *first)]);
    assert_eq!(report.next_seq, first + 1);
    only_evidence(
        &f.data,
        &format!("{}.bad-header", format::segment_name(*first)),
    );
    assert_eq!(
        wal.append_blocking(vec![rec("new")]).unwrap().first,
        first + 1
    );
}
