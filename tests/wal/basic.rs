use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice::wal::io::{Fault, FaultKind, Filesystem, SimFs, StdFs};
use sluice::wal::{format, Wal, WalConfig, WalError};

use super::{open_std, read_all, rec, segment_files, small_cfg};

fn sim_cfg() -> WalConfig {
    small_cfg(std::path::Path::new("/data"))
}

fn open_sim(fs: &SimFs, cfg: &WalConfig, committed: u64) -> Wal {
    Wal::open(
        cfg.clone(),
        Arc::new(fs.clone()) as Arc<dyn Filesystem>,
        committed,
    )
    .expect("open")
    .0
}

#[test]
fn appends_read_back_across_rolls_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let (wal, report) = open_std(&cfg, 0);
    assert_eq!(report.next_seq, 1);
    let mut expected = Vec::new();
    for i in 0..50u64 {
        let tags: Vec<String> = (0..3).map(|j| format!("r{i}-{j}")).collect();
        let range = wal
            .append_blocking(tags.iter().map(|t| rec(t)).collect())
            .unwrap();
        assert_eq!((range.first, range.last), (i * 3 + 1, i * 3 + 3));
        expected.extend(
            tags.into_iter()
                .enumerate()
                .map(|(j, t)| (range.first + j as u64, t)),
        );
    }
    assert!(
        segment_files(dir.path()).len() > 5,
        "1 KiB segments must roll"
    );
    assert_eq!(read_all(&wal, 1).0, expected);
    drop(wal);

    let (wal, report) = open_std(&cfg, 0);
    assert_eq!(report.next_seq, 151);
    assert_eq!(report.truncated_bytes, 0);
    assert!(report.lost.is_empty());
    let (recs, gaps) = read_all(&wal, 1);
    assert_eq!(recs, expected);
    assert!(gaps.is_empty());
    // Reading from the middle starts exactly there.
    assert_eq!(read_all(&wal, 100).0, expected[99..].to_vec());
    assert_eq!(wal.append_blocking(vec![rec("next")]).unwrap().first, 151);
}

#[test]
fn concurrent_appenders_share_fsyncs_and_get_disjoint_contiguous_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(dir.path());
    cfg.segment_bytes = 64 * 1024;
    let wal = Arc::new(open_std(&cfg, 0).0);
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| {
                        let tags: Vec<String> = (0..5).map(|j| format!("t{t}-{i}-{j}")).collect();
                        let r = wal
                            .append_blocking(tags.iter().map(|t| rec(t)).collect())
                            .unwrap();
                        (r, tags)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in threads {
        for (range, tags) in t.join().unwrap() {
            assert_eq!(range.len(), 5);
            for (j, tag) in tags.into_iter().enumerate() {
                acked.push((range.first + j as u64, tag));
            }
        }
    }
    acked.sort();
    let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=3200).collect::<Vec<_>>(), "no overlap, no hole");
    assert_eq!(read_all(&wal, 1).0, acked);
    let c = wal.counters();
    let fsyncs = c.fsyncs.load(Ordering::Relaxed);
    assert_eq!(c.append_requests.load(Ordering::Relaxed), 640);
    assert!(
        fsyncs < 640,
        "group commit: {fsyncs} fsyncs for 640 appends"
    );
}

#[tokio::test]
async fn reader_waits_for_durable_records_without_polling() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(open_std(&small_cfg(dir.path()), 0).0);
    let mut reader = wal.reader(1);
    assert!(reader.try_next().unwrap().is_none());
    let w = wal.clone();
    let task = tokio::spawn(async move { reader.next().await.map(|i| format!("{i:?}")) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!task.is_finished(), "nothing durable yet");
    w.append(vec![rec("hello")]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("reader woke up")
        .unwrap()
        .unwrap();
    assert!(
        got.contains("seq: 1") && got.contains("104, 101, 108, 108, 111"),
        "{got}"
    );
}

#[test]
fn failed_fsync_is_sticky_never_retried_and_never_visible() {
    let fs = SimFs::new();
    let cfg = sim_cfg();
    let wal = open_sim(&fs, &cfg, 0);
    wal.append_blocking(vec![rec("a")]).unwrap();
    let fsyncs = wal.counters().fsyncs.load(Ordering::Relaxed);
    fs.inject(Fault::Sync(FaultKind::Io));
    let err = wal.append_blocking(vec![rec("b")]).unwrap_err();
    assert!(
        matches!(err, WalError::Io(ref e) if e.raw_os_error() == Some(5)),
        "{err}"
    );
    for _ in 0..3 {
        assert!(matches!(
            wal.append_blocking(vec![rec("c")]),
            Err(WalError::Failed(_))
        ));
    }
    assert_eq!(
        wal.counters().fsyncs.load(Ordering::Relaxed),
        fsyncs,
        "no retry"
    );
    assert!(wal.failure().is_some());
    // "b" sits in the page cache but was never durable: readers must not see it.
    assert_eq!(read_all(&wal, 1).0, vec![(1, "a".to_string())]);
    drop(wal);
    fs.crash(|_, _| 0);
    let wal = open_sim(&fs, &cfg, 0);
    assert_eq!(read_all(&wal, 1).0, vec![(1, "a".to_string())]);
    assert_eq!(wal.append_blocking(vec![rec("d")]).unwrap().first, 2);
}

#[test]
fn enospc_mid_write_is_sticky_and_recovery_cuts_the_partial_frame() {
    let fs = SimFs::new();
    let cfg = sim_cfg();
    let wal = open_sim(&fs, &cfg, 0);
    wal.append_blocking(vec![rec("a")]).unwrap();
    fs.inject(Fault::Write {
        written: 7,
        kind: FaultKind::NoSpace,
    });
    let err = wal.append_blocking(vec![rec("b")]).unwrap_err();
    assert!(
        matches!(err, WalError::Io(ref e) if e.raw_os_error() == Some(28)),
        "{err}"
    );
    assert!(matches!(
        wal.append_blocking(vec![rec("c")]),
        Err(WalError::Failed(_))
    ));
    drop(wal);
    // The process restarts without a crash: the 7 bytes are in the file.
    let (wal, report) =
        Wal::open(cfg.clone(), Arc::new(fs.clone()) as Arc<dyn Filesystem>, 0).unwrap();
    assert_eq!(report.truncated_bytes, 7);
    assert_eq!(read_all(&wal, 1).0, vec![(1, "a".to_string())]);
    assert_eq!(wal.append_blocking(vec![rec("c")]).unwrap().first, 2);
}

#[test]
fn quota_full_and_disk_low_refuse_without_failing_the_log() {
    let fs = SimFs::new();
    let mut cfg = sim_cfg();
    cfg.max_bytes = 4096;
    let wal = open_sim(&fs, &cfg, 0);
    let mut last = 0;
    let err = loop {
        match wal.append_blocking(vec![rec(&"x".repeat(100))]) {
            Ok(r) => last = r.last,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, WalError::Full { max: 4096, .. }), "{err}");
    assert!(wal.disk_bytes() <= 4096);
    assert!(wal.failure().is_none(), "full is not a failure");
    // Consuming and GC frees room.
    let removed = wal.remove_through(last).unwrap();
    assert!(removed > 0);
    wal.append_blocking(vec![rec("after gc")]).unwrap();

    // Free space: leave less than min_free_bytes.
    let mut cfg = sim_cfg();
    cfg.min_free_bytes = 10_000;
    let fs = SimFs::new();
    let wal = open_sim(&fs, &cfg, 0);
    fs.set_capacity(fs.used_bytes() + 10_100);
    wal.append_blocking(vec![rec("fits")]).unwrap();
    let err = wal
        .append_blocking(vec![rec(&"y".repeat(200))])
        .unwrap_err();
    assert!(
        matches!(err, WalError::DiskLow { min: 10_000, .. }),
        "{err}"
    );
    fs.set_capacity(u64::MAX);
    wal.append_blocking(vec![rec("space is back")]).unwrap();
    assert_eq!(wal.counters().refused_disk_low.load(Ordering::Relaxed), 1);
}

#[test]
fn gc_removes_only_sealed_segments_at_or_below_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let wal = open_std(&cfg, 0).0;
    for i in 0..40 {
        wal.append_blocking(vec![rec(&format!("{i:0>60}"))])
            .unwrap();
    }
    let before = segment_files(dir.path());
    let firsts: Vec<u64> = before
        .iter()
        .map(|n| format::parse_segment_name(n).unwrap())
        .collect();
    // Through the last record of the second segment: exactly two go.
    let through = firsts[2] - 1;
    assert_eq!(wal.remove_through(through).unwrap(), 2);
    assert_eq!(segment_files(dir.path()), before[2..].to_vec());
    // One below a boundary removes nothing more.
    assert_eq!(wal.remove_through(firsts[3] - 2).unwrap(), 0);
    // Everything: the active segment stays.
    wal.remove_through(u64::MAX).unwrap();
    assert_eq!(
        segment_files(dir.path()),
        vec![before.last().unwrap().clone()]
    );
    let (recs, gaps) = read_all(&wal, through + 1);
    assert!(gaps.iter().all(|g| g.last < *firsts.last().unwrap()));
    assert_eq!(recs.last().unwrap().0, 40);
}

#[test]
fn open_deletes_tmp_and_consumed_segments_and_continues_after_committed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    {
        let wal = open_std(&cfg, 0).0;
        for i in 0..40 {
            wal.append_blocking(vec![rec(&format!("{i:0>60}"))])
                .unwrap();
        }
    }
    std::fs::write(
        dir.path().join("wal").join("00000000000000000099.wal.tmp"),
        b"half",
    )
    .unwrap();
    let segs = segment_files(dir.path());
    let second = format::parse_segment_name(&segs[1]).unwrap();
    let (wal, report) = open_std(&cfg, second);
    assert_eq!(report.removed_tmp, 1);
    assert_eq!(
        report.removed_consumed, 1,
        "only the first lies wholly below"
    );
    assert!(report.lost.is_empty(), "consumed segments are not a loss");
    let (recs, gaps) = read_all(&wal, second + 1);
    assert!(gaps.is_empty());
    assert_eq!(recs.first().unwrap().0, second + 1);
    drop(wal);

    // A committed offset beyond everything on disk (the WAL was wiped):
    // numbering continues after it in a fresh segment, nothing is reported.
    let (wal, report) = open_std(&cfg, 1000);
    assert_eq!(report.next_seq, 1001);
    assert!(report.lost.is_empty());
    assert_eq!(wal.append_blocking(vec![rec("z")]).unwrap().first, 1001);
}

#[test]
fn reader_never_reports_loss_twice_for_the_same_range() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    {
        let wal = open_std(&cfg, 0).0;
        for i in 0..40 {
            wal.append_blocking(vec![rec(&format!("{i:0>60}"))])
                .unwrap();
        }
    }
    let segs = segment_files(dir.path());
    std::fs::remove_file(dir.path().join("wal").join(&segs[1])).unwrap();
    let (wal, _) = open_std(&cfg, 0);
    let (_, gaps1) = read_all(&wal, 1);
    let (_, gaps2) = read_all(&wal, 1);
    assert_eq!(gaps1.len(), 1);
    assert_eq!(gaps1, gaps2, "a restarted reader still skips the range");
    assert_eq!(
        wal.counters().lost_records.load(Ordering::Relaxed),
        gaps1[0].len(),
        "but it is counted once"
    );
}

/// Appends `n` records tagged `t1..tn` one by one on the simulated disk and
/// closes the log. Returns the path of the only segment.
fn sim_log(fs: &SimFs, cfg: &WalConfig, n: u64) -> std::path::PathBuf {
    let wal = open_sim(fs, cfg, 0);
    for i in 1..=n {
        wal.append_blocking(vec![rec(&format!("t{i}"))]).unwrap();
    }
    drop(wal);
    cfg.dir.join(format::segment_name(1))
}

#[test]
fn a_full_disk_that_cannot_hold_the_quarantine_copy_does_not_stop_the_start() {
    let fs = SimFs::new();
    let mut cfg = sim_cfg();
    cfg.segment_bytes = 1 << 20;
    let path = sim_log(&fs, &cfg, 5);
    let mut bytes = fs.read_file(&path).unwrap();
    let valid = bytes.len() as u64;
    bytes.extend(std::iter::repeat_n(0xAB, 3000)); // not zeros: evidence
    fs.write_file(&path, &bytes);
    fs.set_capacity(fs.used_bytes() + 100);

    let (wal, report) = Wal::open(cfg.clone(), Arc::new(fs.clone()) as Arc<dyn Filesystem>, 0)
        .expect("starts although the evidence does not fit");
    assert_eq!(report.truncated_bytes, 3000);
    assert!(report.quarantined.is_empty());
    assert_eq!(
        report.not_quarantined,
        vec![format!("{}.tail-{valid}", format::segment_name(1))]
    );
    assert_eq!(wal.stats().quarantine_failures, 1);
    assert!(
        fs.list(&cfg.quarantine_dir).unwrap().is_empty(),
        "the partial copy is removed, not left to hold space"
    );
    assert_eq!(read_all(&wal, 1).0.len(), 5);
    assert_eq!(wal.append_blocking(vec![rec("t6")]).unwrap().first, 6);
}

#[test]
fn damage_in_the_last_segment_on_a_full_disk_is_counted_exactly() {
    let fs = SimFs::new();
    let mut cfg = sim_cfg();
    cfg.segment_bytes = 1 << 20;
    let path = sim_log(&fs, &cfg, 30);
    let mut bytes = fs.read_file(&path).unwrap();
    let frame_len = format::frame_len(rec("t10").len());
    // Frame 10's checksum: the intact frames 11..=30 cannot be moved to a
    // segment of their own on a full disk.
    bytes[format::HEADER_LEN + 9 * frame_len] ^= 1;
    fs.write_file(&path, &bytes);
    fs.set_capacity(fs.used_bytes() + 10);
    let (wal, report) =
        Wal::open(cfg.clone(), Arc::new(fs.clone()) as Arc<dyn Filesystem>, 0).expect("starts");
    let lost = sluice::wal::Gap {
        first: 10,
        last: 30,
        reason: sluice::wal::GapReason::Corrupt,
    };
    assert_eq!(report.lost, vec![lost]);
    assert_eq!(report.next_seq, 31);
    let (recs, gaps) = read_all(&wal, 1);
    assert_eq!(recs.len(), 9);
    assert_eq!(
        gaps,
        vec![lost],
        "the reader skips the same range, counted once"
    );
    assert_eq!(wal.counters().lost_records.load(Ordering::Relaxed), 21);
}

/// Two damaged frames (10 and 20 of 30) on a full disk: nothing after the
/// first damage is reachable, so every number up to the highest intact one
/// is counted, and none of them is handed out again.
#[test]
fn a_second_damage_in_the_last_segment_on_a_full_disk_is_counted_to_the_end() {
    let fs = SimFs::new();
    let mut cfg = sim_cfg();
    cfg.segment_bytes = 1 << 20;
    let path = sim_log(&fs, &cfg, 30);
    let mut bytes = fs.read_file(&path).unwrap();
    let frame_len = format::frame_len(rec("t10").len());
    bytes[format::HEADER_LEN + 9 * frame_len + 20] ^= 1;
    bytes[format::HEADER_LEN + 19 * frame_len + 20] ^= 1;
    fs.write_file(&path, &bytes);
    fs.set_capacity(fs.used_bytes() + 10);
    let (wal, report) =
        Wal::open(cfg.clone(), Arc::new(fs.clone()) as Arc<dyn Filesystem>, 0).expect("starts");
    let lost = sluice::wal::Gap {
        first: 10,
        last: 30,
        reason: sluice::wal::GapReason::Corrupt,
    };
    assert_eq!(report.lost, vec![lost]);
    assert_eq!(report.next_seq, 31);
    let (recs, gaps) = read_all(&wal, 1);
    assert_eq!(recs.len(), 9);
    assert_eq!(gaps, vec![lost]);
    assert_eq!(wal.counters().lost_records.load(Ordering::Relaxed), 21);
    fs.set_capacity(u64::MAX);
    assert_eq!(wal.append_blocking(vec![rec("t31")]).unwrap().first, 31);
}

/// A damaged header in the last segment on a full disk: the header is
/// rewritten in place (no space needed), so every intact frame is kept, even
/// though the evidence copy does not fit.
#[test]
fn a_bad_header_last_segment_on_a_full_disk_keeps_its_frames() {
    let fs = SimFs::new();
    let mut cfg = sim_cfg();
    cfg.segment_bytes = 1 << 20;
    let path = sim_log(&fs, &cfg, 30);
    let mut bytes = fs.read_file(&path).unwrap();
    bytes[3] ^= 1;
    fs.write_file(&path, &bytes);
    fs.set_capacity(fs.used_bytes() + 10);
    let (wal, report) =
        Wal::open(cfg.clone(), Arc::new(fs.clone()) as Arc<dyn Filesystem>, 0).expect("starts");
    assert!(report.lost.is_empty(), "{report:?}");
    assert_eq!(report.next_seq, 31);
    assert_eq!(read_all(&wal, 1).0.len(), 30);
    fs.set_capacity(u64::MAX);
    assert_eq!(wal.append_blocking(vec![rec("t31")]).unwrap().first, 31);
}

#[test]
fn gc_goes_on_when_a_consumed_segment_is_already_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let (wal, _) = open_std(&cfg, 0);
    for i in 0..40 {
        wal.append_blocking(vec![rec(&format!("r{i}"))]).unwrap();
    }
    let before = segment_files(dir.path());
    assert!(before.len() >= 4);
    std::fs::remove_file(dir.path().join("wal").join(&before[1])).unwrap();
    let removed = wal.remove_through(40).expect("NotFound is not an error");
    assert_eq!(removed, before.len() - 1, "every sealed segment is gone");
    assert_eq!(
        segment_files(dir.path()),
        vec![before.last().unwrap().clone()]
    );
    assert_eq!(wal.stats().segments, 1);
}

/// A filesystem whose unlinks wait for the test's go-ahead.
struct SlowUnlinks {
    entered: std::sync::mpsc::SyncSender<()>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Filesystem for SlowUnlinks {
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn open(&self, path: &std::path::Path) -> std::io::Result<Box<dyn sluice::wal::io::WalFile>> {
        StdFs.open(path)
    }
    fn open_direct(
        &self,
        path: &std::path::Path,
    ) -> std::io::Result<Box<dyn sluice::wal::io::WalFile>> {
        StdFs.open_direct(path)
    }
    fn create(&self, path: &std::path::Path) -> std::io::Result<Box<dyn sluice::wal::io::WalFile>> {
        StdFs.create(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        let _ = self.entered.try_send(());
        let _ = self.go.lock().unwrap().recv();
        StdFs.remove(path)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn free_bytes(&self, dir: &std::path::Path) -> std::io::Result<u64> {
        StdFs.free_bytes(dir)
    }
}

#[test]
fn appends_complete_while_gc_is_inside_an_unlink() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
    let (go, go_rx) = std::sync::mpsc::channel();
    let fs = SlowUnlinks {
        entered: entered_tx,
        go: std::sync::Mutex::new(go_rx),
    };
    let wal = Arc::new(
        Wal::open(cfg, Arc::new(fs) as Arc<dyn Filesystem>, 0)
            .unwrap()
            .0,
    );
    for i in 0..30 {
        wal.append_blocking(vec![rec(&format!("r{i}"))]).unwrap();
    }
    let gc = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.remove_through(30))
    };
    entered
        .recv_timeout(Duration::from_secs(30))
        .expect("GC reached an unlink");
    // GC is blocked inside an unlink. An append must still be acknowledged.
    let (done_tx, done) = std::sync::mpsc::channel();
    {
        let wal = wal.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(wal.append_blocking(vec![rec("during-gc")]));
        });
    }
    let appended = done.recv_timeout(Duration::from_secs(30));
    for _ in 0..100 {
        let _ = go.send(());
    }
    let removed = gc.join().unwrap().unwrap();
    assert!(removed >= 2);
    let range = appended
        .expect("the append was not blocked by GC")
        .expect("append");
    assert_eq!(range.first, 31);
}

#[test]
fn a_disk_with_no_room_for_a_new_segment_still_opens_and_appends_once_space_returns() {
    let fs = SimFs::new();
    let mut cfg = sim_cfg();
    cfg.segment_bytes = 1 << 20;
    sim_log(&fs, &cfg, 5);
    fs.set_capacity(fs.used_bytes());
    let wal = open_sim(&fs, &cfg, 0);
    assert_eq!(read_all(&wal, 1).0.len(), 5, "replay can run");
    fs.set_capacity(u64::MAX);
    assert_eq!(wal.append_blocking(vec![rec("t6")]).unwrap().first, 6);
    drop(wal);
    fs.crash(|_, _| 0);
    let wal = open_sim(&fs, &cfg, 0);
    assert_eq!(read_all(&wal, 1).0.len(), 6);
}
