//! The checkpoint on real files with real fsyncs: its format, what a
//! commit writes, deaths between its steps, and format 1's upgrade.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::archive::analytics::Counter;
use crate::archive::layout::Layout;
use crate::archive::writer::{Writer, WriterOptions};

/// Options that keep every hour open (only the bound seals).
fn opts(dir: &Path) -> WriterOptions {
    let mut o = WriterOptions::new(dir);
    o.idle_close = Duration::from_secs(3600);
    o.analytics.fields = vec!["path".into()];
    o
}

/// An event in hour `h` after 2026-11-24T00 with this `path`.
fn ev(h: i64, path: &str) -> Vec<u8> {
    let ms = 1_795_478_400_000 + h * 3_600_000; // 2026-11-24T00:00:00Z
    serde_json::to_vec(
        &json!({"tenant_id": "t", "source": "web", "severity": "INFO",
                               "timestamp": ms, "path": path}),
    )
    .unwrap()
}

fn hour(h: i64) -> Hour {
    Hour(Hour::parse("2026-11-24T00").unwrap().0 + h)
}

/// The main file's body.
fn main_body(dir: &Path) -> Value {
    let bytes = std::fs::read(dir.join(FILE)).unwrap();
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    serde_json::from_slice(&bytes[nl + 1..]).unwrap()
}

/// The names in `checkpoint.d/`, sorted.
fn hour_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(HOURS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The names the main file gives its hours' files, sorted.
fn named_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = main_body(dir)["hours"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, g)| format!("{k}.{g}.json"))
        .collect();
    names.sort();
    names
}

/// Bytes this thread handed to write(2) so far (`wchar`, kernel-counted).
fn thread_wchar() -> u64 {
    std::fs::read_to_string("/proc/thread-self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

#[test]
fn round_trips_and_detects_damage() {
    let d = tempfile::tempdir().unwrap();
    assert!(read(d.path()).unwrap().is_none());
    let (mut store, none) = Store::open(d.path()).unwrap();
    assert!(none.is_none());
    let stats = HourStats {
        total: 3,
        ..Default::default()
    };
    let progress = json!({"next": {"0": 7}});
    let mut out = CheckpointOut::empty(&progress);
    out.files.insert("logs/a".into(), 42);
    out.hours.insert("2026-11-26T12".into(), (&stats, true));
    store.commit(&out).unwrap();
    let cp = read(d.path()).unwrap().unwrap();
    assert_eq!(cp.files["logs/a"], 42);
    assert_eq!(cp.hours["2026-11-26T12"], stats);
    assert_eq!(cp.progress, progress);
    let header = std::fs::read_to_string(d.path().join(FILE)).unwrap();
    assert!(
        header.starts_with("sluice-archive-checkpoint 2 "),
        "{header}"
    );
    // A damaged main file is refused.
    let path = d.path().join(FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = read(d.path()).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(Store::open(d.path()).is_err());
}

#[test]
fn a_format_this_build_does_not_know_is_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let body = br#"{"files":{}}"#;
    let mut bytes = format!(
        "sluice-archive-checkpoint 3 {:08x}\n",
        crc32fast::hash(body)
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    std::fs::write(d.path().join(FILE), bytes).unwrap();
    let err = Writer::open(opts(d.path())).err().unwrap().to_string();
    assert!(
        err.contains("format 3") && err.contains("reads format 1 and 2"),
        "{err}"
    );
    assert!(err.contains("refusing to start"), "{err}");
}

#[test]
fn valid_checkpoint_files_past_the_bound_are_read_with_values_cut() {
    let d = tempfile::tempdir().unwrap();
    let spec = AnalyticsSpec {
        max_tracked: 2,
        fields: vec!["path".into()],
        ..Default::default()
    };
    // What a build without the cap wrote: 3 MB values, 2 sharing their
    // first 256 bytes.
    let long = |c: char| format!("/{}", c.to_string().repeat(3 << 20));
    let mut path = Counter::default();
    path.counts.insert(long('a'), 2);
    path.counts.insert(format!("{}x", long('a')), 3);
    path.counts.insert(long('é'), 1);
    let mut h = HourStats::default();
    h.fields.insert("path".into(), path);
    let check = |cp: &Checkpoint| {
        let counts = &cp.hours["2026-11-26T12"].fields["path"].counts;
        assert_eq!(counts.len(), 2);
        for (k, n) in counts {
            assert!(k.len() <= MAX_VALUE_BYTES + CUT_MARK.len() && k.ends_with(CUT_MARK));
            assert!(*n == 5 || *n == 1, "{k}: {n}");
        }
    };
    let bounds = Bounds::new(&spec, 3, 40);
    assert!(bounds.whole - PROGRESS_ALLOWANCE < 200_000);
    // Format 1: all inline.
    let mut cp = Checkpoint::default();
    cp.hours.insert("2026-11-26T12".into(), h.clone());
    let len = write_v1(d.path(), &cp).unwrap();
    assert!(len > bounds.whole, "{len} {bounds:?}");
    check(&read(d.path()).unwrap().unwrap());
    // Format 2: in the hour's file.
    let (mut store, _) = Store::open(d.path()).unwrap();
    let none = Value::Null;
    let mut out = CheckpointOut::empty(&none);
    out.hours.insert("2026-11-26T12".into(), (&h, true));
    let w = store.commit(&out).unwrap();
    assert!(w.largest_hour > bounds.hour && w.main_bytes < bounds.main);
    check(&read(d.path()).unwrap().unwrap());
}

/// Issue 26 item 2: 64 open hours of 1,000 distinct ~250-byte paths each;
/// one line in one hour; the commit writes that hour's file and the main
/// file, not the 64 hours (16,463,800 bytes written before).
#[test]
fn a_commit_after_one_hour_changed_writes_only_that_hours_file() {
    let d = tempfile::tempdir().unwrap();
    let (mut w, _) = Writer::open(opts(d.path())).unwrap();
    for h in 0..64 {
        for i in 0..1000 {
            let path = format!("/{h}/{i}/{}", "p".repeat(240));
            w.append(&ev(h, &path), &Value::Null).unwrap();
        }
    }
    w.commit(&json!({"n": 1})).unwrap();
    let m = w.metrics();
    let total = m.checkpoint_bytes.load(Relaxed);
    assert!(total > 16_000_000, "{total}");
    let before = hour_files(d.path());
    assert_eq!(before.len(), 64);
    assert_eq!(before, named_files(d.path()));
    let inodes = |names: &[String]| -> Vec<u64> {
        use std::os::unix::fs::MetadataExt;
        names
            .iter()
            .map(|n| {
                std::fs::metadata(d.path().join(HOURS_DIR).join(n))
                    .unwrap()
                    .ino()
            })
            .collect()
    };
    let inodes_before = inodes(&before);

    w.append(&ev(5, "/one-more"), &Value::Null).unwrap();
    let wchar = thread_wchar();
    w.commit(&json!({"n": 2})).unwrap();
    let wrote = thread_wchar() - wchar;

    let after = hour_files(d.path());
    assert_eq!(after, named_files(d.path()));
    let changed: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    let key = hour(5).key();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(changed[0].starts_with(&format!("{key}.")), "{changed:?}");
    // The other 63 are the same files, untouched.
    let kept: Vec<String> = after
        .iter()
        .filter(|n| before.contains(n))
        .cloned()
        .collect();
    assert_eq!(kept.len(), 63);
    let idx: Vec<usize> = kept
        .iter()
        .map(|n| before.iter().position(|b| b == n).unwrap())
        .collect();
    let inodes_kept: Vec<u64> = idx.iter().map(|&i| inodes_before[i]).collect();
    assert_eq!(inodes(&kept), inodes_kept);
    let hour_len = file_len(&d.path().join(HOURS_DIR).join(changed[0]));
    let main_len = file_len(&d.path().join(FILE));
    let written = m.checkpoint_written_bytes.load(Relaxed);
    assert_eq!(written, hour_len + main_len);
    // Every byte the commit handed to the kernel: the line, the hour's
    // file, the main file and the hour's (unsynced) summary.
    let summary = file_len(&d.path().join(w.options().layout.summary(hour(5))));
    eprintln!(
        "64 open hours, one changed: the commit wrote {wrote} bytes (checkpoint {written}: \
         hour file {hour_len} + main {main_len}; summary {summary}); the checkpoint is {} bytes",
        m.checkpoint_bytes.load(Relaxed)
    );
    assert!(wrote <= written + summary + 4096, "{wrote}");
    assert!(written < total / 30, "{written} of {total}");
    // And reopening gives the counts back from the 64 files.
    let h5 = w.analytics().hour(hour(5)).unwrap().unwrap();
    drop(w);
    let (w, progress) = Writer::open(opts(d.path())).unwrap();
    assert_eq!(progress, json!({"n": 2}));
    assert_eq!(w.analytics().hour(hour(5)).unwrap().unwrap(), h5);
    assert_eq!(h5.total, 1001);
}

/// A directory with hours `0..hours` open, `lines(h)` lines in hour `h`
/// (paths `/0`, `/1`, ...), committed with `progress`.
fn committed(dir: &Path, hours: i64, lines: impl Fn(i64) -> i64, progress: Value) {
    let (mut w, _) = Writer::open(opts(dir)).unwrap();
    for h in 0..hours {
        for i in 0..lines(h) {
            w.append(&ev(h, &format!("/{i}")), &Value::Null).unwrap();
        }
    }
    w.commit(&progress).unwrap();
}

/// Where a commit dies, made real: a directory where it wants to create a
/// `.tmp` makes that create fail, and the writer is dropped as a killed
/// process would be (nothing after the failure runs).
fn die_at(dir: &Path, blocker: &Path, progress: Value) {
    let (mut w, _) = Writer::open(opts(dir)).unwrap();
    for h in 0..4 {
        w.append(&ev(h, "/late"), &Value::Null).unwrap();
    }
    w.append(&ev(9, "/new-hour"), &Value::Null).unwrap();
    std::fs::create_dir(blocker).unwrap();
    assert!(w.commit(&progress).is_err());
    drop(w);
    std::fs::remove_dir(blocker).unwrap();
}

#[test]
fn a_death_between_the_hour_files_and_the_main_rename_restores_the_previous_commit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    committed(dir, 4, |_| 3, json!({"n": 1}));
    let committed = read(dir).unwrap().unwrap();
    let named = named_files(dir);
    let gen = main_body(dir)["generation"].as_u64().unwrap() + 1;
    let log = |h: i64| dir.join(Layout::default().log(hour(h)));
    let lens: Vec<u64> = (0..4).map(|h| file_len(&log(h))).collect();
    let check = |what: &str| {
        let (w, progress) = Writer::open(opts(dir)).unwrap();
        assert_eq!(progress, json!({"n": 1}), "{what}");
        for h in 0..4 {
            let s = w.analytics().hour(hour(h)).unwrap().unwrap();
            assert_eq!(s, committed.hours[&hour(h).key()], "{what}: hour {h}");
            assert_eq!(file_len(&log(h)), lens[h as usize], "{what}: hour {h}");
        }
        assert!(!log(9).exists(), "{what}");
        assert_eq!(
            hour_files(dir),
            named,
            "{what}: only the named files are left"
        );
        drop(w);
        assert_eq!(read(dir).unwrap().unwrap(), committed, "{what}");
    };
    // Dying among the hour files: hours 0 and 1 written (fsynced, renamed),
    // hour 2's create fails; a torn `.tmp` of hour 3 is what a kill in the
    // middle of its write leaves.
    let hours_dir = dir.join(HOURS_DIR);
    die_at(
        dir,
        &hours_dir.join(format!("{}.{gen}.json.tmp", hour(2).key())),
        json!({"n": 2}),
    );
    let orphans = hour_files(dir);
    assert_eq!(orphans.len(), named.len() + 2, "{orphans:?}");
    std::fs::write(
        hours_dir.join(format!("{}.{gen}.json.tmp", hour(3).key())),
        b"sluice-archive-hour 1 0000",
    )
    .unwrap();
    check("died among the hour files");
    // Dying after every hour file, before the main file's rename.
    die_at(dir, &dir.join(format!("{FILE}.tmp")), json!({"n": 3}));
    assert_eq!(hour_files(dir).len(), named.len() + 5);
    check("died before the main file's rename");
}

#[test]
fn a_death_after_the_main_rename_keeps_the_new_commit_and_its_leftovers_go() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (mut w, _) = Writer::open(opts(dir)).unwrap();
    w.append(&ev(0, "/a"), &Value::Null).unwrap();
    w.append(&ev(1, "/b"), &Value::Null).unwrap();
    w.commit(&json!({"n": 1})).unwrap();
    let old: Vec<(String, Vec<u8>)> = hour_files(dir)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(HOURS_DIR).join(&n)).unwrap();
            (n, b)
        })
        .collect();
    w.append(&ev(0, "/c"), &Value::Null).unwrap();
    w.commit(&json!({"n": 2})).unwrap();
    let committed = read(dir).unwrap().unwrap();
    drop(w);
    // The unlinks of step 3 never happened: the old generations are back.
    for (n, b) in &old {
        std::fs::write(dir.join(HOURS_DIR).join(n), b).unwrap();
    }
    assert_eq!(hour_files(dir).len(), 3);
    let (w, progress) = Writer::open(opts(dir)).unwrap();
    assert_eq!(progress, json!({"n": 2}));
    assert_eq!(w.analytics().hour(hour(0)).unwrap().unwrap().total, 2);
    assert_eq!(hour_files(dir), named_files(dir));
    assert_eq!(hour_files(dir).len(), 2);
    drop(w);
    assert_eq!(read(dir).unwrap().unwrap(), committed);
}

#[test]
fn a_format_1_checkpoint_is_read_and_upgraded_by_the_next_commit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    committed(dir, 3, |_| 1, json!({"n": 1}));
    // What a build before issue 26 item 2 left: one file, hours inline,
    // no checkpoint.d/.
    let cp = read(dir).unwrap().unwrap();
    write_v1(dir, &cp).unwrap();
    std::fs::remove_dir_all(dir.join(HOURS_DIR)).unwrap();
    let header = std::fs::read_to_string(dir.join(FILE)).unwrap();
    assert!(header.starts_with("sluice-archive-checkpoint 1 "));
    assert_eq!(read(dir).unwrap().unwrap(), cp);

    let (mut w, progress) = Writer::open(opts(dir)).unwrap();
    assert_eq!(progress, json!({"n": 1}));
    for h in 0..3 {
        assert_eq!(w.analytics().hour(hour(h)).unwrap().unwrap().total, 1);
    }
    // The next commit writes every open hour's file, changed or not.
    w.append(&ev(0, "/b"), &Value::Null).unwrap();
    w.commit(&json!({"n": 2})).unwrap();
    let header = std::fs::read_to_string(dir.join(FILE)).unwrap();
    assert!(
        header.starts_with("sluice-archive-checkpoint 2 "),
        "{header}"
    );
    assert_eq!(hour_files(dir).len(), 3);
    assert_eq!(hour_files(dir), named_files(dir));
    drop(w);
    let (w, progress) = Writer::open(opts(dir)).unwrap();
    assert_eq!(progress, json!({"n": 2}));
    let totals: Vec<u64> = (0..3)
        .map(|h| w.analytics().hour(hour(h)).unwrap().unwrap().total)
        .collect();
    assert_eq!(totals, [2, 1, 1]);
}

#[test]
fn a_missing_or_damaged_hour_file_is_rebuilt_from_the_hours_file_with_a_copy_kept() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    committed(dir, 3, |h| h + 1, json!({"n": 1}));
    let committed = read(dir).unwrap().unwrap();
    let named = named_files(dir);
    let file = |h: i64| {
        let key = hour(h).key();
        dir.join(HOURS_DIR)
            .join(named.iter().find(|n| n.starts_with(&key)).unwrap())
    };
    // Hour 0's file gone, hour 1's damaged (a flipped bit in its body).
    std::fs::remove_file(file(0)).unwrap();
    let mut bytes = std::fs::read(file(1)).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 1;
    std::fs::write(file(1), &bytes).unwrap();
    // Read offline, it is an error naming the file.
    let err = read(dir).unwrap_err().to_string();
    assert!(err.contains(HOURS_DIR) && err.contains("missing"), "{err}");

    let (mut w, progress) = Writer::open(opts(dir)).unwrap();
    assert_eq!(progress, json!({"n": 1}));
    let m = w.metrics();
    assert_eq!(m.checkpoint_entries_dropped.load(Relaxed), 2);
    assert_eq!(m.hours_rebuilt.load(Relaxed), 2);
    for h in 0..3 {
        let s = w.analytics().hour(hour(h)).unwrap().unwrap();
        let want = &committed.hours[&hour(h).key()];
        assert_eq!((s.total, s.bytes), (want.total, want.bytes), "hour {h}");
        assert_eq!(s.fields["path"].counts, want.fields["path"].counts);
    }
    // A copy of the main file and of the damaged hour file.
    let copies = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with("checkpoint.unreadable-")
        })
        .count();
    assert_eq!(copies, 2);
    // The next commit writes both hours again; the damaged file goes.
    w.commit(&json!({"n": 2})).unwrap();
    assert_eq!(hour_files(dir), named_files(dir));
    assert!(!file(1).exists());
    drop(w);
    let cp = read(dir).unwrap().unwrap();
    assert_eq!(cp.hours.len(), 3);
}

#[test]
fn a_sealed_hour_leaves_the_main_file_before_its_file_is_unlinked() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut o = opts(dir);
    o.max_open_hours = 2;
    let (mut w, _) = Writer::open(o).unwrap();
    for h in 0..3 {
        w.append(&ev(h, "/a"), &Value::Null).unwrap();
    }
    // Three open, bound 2: the least recently written (hour 0) seals.
    w.commit(&json!({"n": 1})).unwrap();
    let keys: Vec<String> = main_body(dir)["hours"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, [hour(1).key(), hour(2).key()]);
    assert_eq!(hour_files(dir), named_files(dir));
    w.close_all(&json!({"n": 2})).unwrap();
    assert!(hour_files(dir).is_empty());
    assert_eq!(w.analytics().hour(hour(0)).unwrap().unwrap().total, 1);
}
