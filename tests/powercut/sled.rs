//! sled under power cuts: does the offset store keep its promises? The
//! store alone (`sluice::replay::offsets::OffsetStore`, sled 0.34 inside),
//! in a child process (this binary again) whose data dir is on the mount.
//!
//! The child opens the store with `open_or_reset`, checks it against every
//! promise it made before (journalled off the mount, where kill -9 keeps
//! them), then writes as the daemon does, as fast as it can: a fate
//! (`record_fate`) now and then, a partition pin (`add_partition_pins`)
//! now and then, a filler row so that sled's log turns over, and a commit
//! (`commit`) each step. A call's effect is promised once it returned: the
//! offset and every fate recorded before it after `commit`, a pin after
//! `add_partition_pins`. The parent kills the child at random moments
//! (a third of them inside the open), cuts (a third torn), and starts it
//! again.
//!
//! Counted: opens, failed opens (a failure), resets (`open_or_reset`
//! quarantined or rolled forward: sled would not open, or lost writes), and
//! promises broken: a committed offset below the last promised one, a fate
//! or pin missing. Each broken promise is a failure. After a reset the
//! child starts a new epoch of promises (there is no WAL here to bound the
//! reset, so what the reset discards is counted, not judged again).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use sluice::replay::offsets::{Fate, OffsetStore};
use sluice::replay::partition::{Pin, Scheme};

use super::shared::Rng;
use super::{begin, cut, Report, Run};

/// Set in the child's environment: its data dir (on the mount).
pub const CHILD_ENV: &str = "POWERCUT_SLED_CHILD";
/// The child's journal of promises and verdicts (off the mount).
const JOURNAL_ENV: &str = "POWERCUT_SLED_JOURNAL";
/// Set for the last child: open, verify, exit.
const VERIFY_ONLY_ENV: &str = "POWERCUT_SLED_VERIFY_ONLY";
/// Set for the `sled-flush-only` experiment: sled alone, trusted as sled
/// documents it (a write is durable once `flush()` returned), without the
/// offset store's fsyncs.
const FLUSH_ONLY_ENV: &str = "POWERCUT_SLED_FLUSH_ONLY";
const TOPIC: &str = "events";

/// What the journal promises since its last epoch.
#[derive(Default)]
struct Promises {
    commit: u64,
    fates: BTreeSet<(u64, u64)>,
    pins: BTreeSet<(u64, i32)>,
}

fn promises(journal: &str) -> Promises {
    let mut p = Promises::default();
    for line in journal.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match f[0] {
            "epoch" => p = Promises::default(),
            "commit" => p.commit = p.commit.max(num(1).unwrap_or(0)),
            "fate" => {
                if let (Some(a), Some(b)) = (num(1), num(2)) {
                    p.fates.insert((a, b));
                }
            }
            "pin" => {
                if let (Some(a), Some(n)) = (num(1), num(2)) {
                    p.pins.insert((a, n as i32));
                }
            }
            _ => {}
        }
    }
    p
}

/// The child's main: never returns while writing; killed by the parent.
pub fn child(data: &Path) -> ExitCode {
    let journal_path = PathBuf::from(std::env::var_os(JOURNAL_ENV).expect("journal path"));
    let before = std::fs::read_to_string(&journal_path).unwrap_or_default();
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal_path)
        .expect("journal");
    let mut note = |line: String| {
        // One write per line, off the mount: kill -9 keeps it.
        journal
            .write_all(format!("{line}\n").as_bytes())
            .expect("journal write");
    };
    if let Err(e) = sluice::storage::durable::create_dir_durable(data) {
        note(format!("open-failed create {}: {e}", data.display()));
        return ExitCode::from(3);
    }
    if std::env::var_os(FLUSH_ONLY_ENV).is_some() {
        return flush_only_child(data, &before, &mut note);
    }
    let (store, reset) = match OffsetStore::open_or_reset(data, &data.join("wal")) {
        Ok(v) => v,
        Err(e) => {
            note(format!("open-failed {e}"));
            return ExitCode::from(3);
        }
    };
    let committed = store.committed().expect("committed");
    let p = promises(&before);
    let mut broken = Vec::new();
    if let Some(r) = &reset {
        note(format!(
            "reset committed={} quarantined={:?} promised={} reason={}",
            r.committed, r.quarantined, p.commit, r.reason
        ));
    } else {
        if committed < p.commit {
            broken.push(format!(
                "rollback committed={committed} promised={}",
                p.commit
            ));
        }
        for &(a, b) in &p.fates {
            let (fa, fb) = (store.fate(a).ok().flatten(), store.fate(b).ok().flatten());
            if fa != Some(Fate::Lost) || fb != Some(Fate::Lost) {
                broken.push(format!("fate-missing {a}..={b} found {fa:?}/{fb:?}"));
            }
        }
        let (pins, damaged) = store.partition_pins(TOPIC).expect("pins");
        let held: BTreeSet<(u64, i32)> = pins
            .pins()
            .iter()
            .map(|p| (p.from_seq, p.partitions))
            .collect();
        for pin in p.pins.difference(&held) {
            broken.push(format!("pin-missing from={} partitions={}", pin.0, pin.1));
        }
        if !damaged.is_empty() {
            broken.push(format!("pins-damaged {damaged:?}"));
        }
    }
    note(format!(
        "open committed={committed} promised={} fates={} pins={} reset={}",
        p.commit,
        p.fates.len(),
        p.pins.len(),
        reset.is_some()
    ));
    for b in &broken {
        note(format!("broken {b}"));
    }
    if reset.is_some() || !broken.is_empty() {
        // What the store holds now is the base of the next promises.
        note("epoch".into());
        note(format!("commit {committed}"));
    }
    if std::env::var_os(VERIFY_ONLY_ENV).is_some() {
        return ExitCode::SUCCESS;
    }
    let mut c = committed;
    for step in 0u64.. {
        let next = c + 10;
        let fate = (step % 5 == 0).then_some((c + 1, c + 3));
        if let Some((a, b)) = fate {
            store.record_fate(a, b, Fate::Lost).expect("record_fate");
        }
        if step % 40 == 7 {
            let pin = Pin {
                from_seq: next,
                partitions: (step % 30) as i32 + 1,
                scheme: Scheme::Murmur2,
            };
            store
                .add_partition_pins(TOPIC, &[pin])
                .expect("add_partition_pins");
            note(format!("pin {} {}", pin.from_seq, pin.partitions));
        }
        store
            .db()
            .insert(format!("filler-{}", step % 64), vec![step as u8; 700])
            .expect("filler");
        store.commit(next).expect("commit");
        note(format!("commit {next}"));
        if let Some((a, b)) = fate {
            note(format!("fate {a} {b}"));
        }
        c = next;
    }
    ExitCode::SUCCESS
}

/// The `sled-flush-only` child: sled 0.34 configured as the offset store
/// configures it, but promising a value once `flush()` returned, as sled's
/// documentation does. Opens, checks the last promised value, fsyncs every
/// file and directory once (so that sled's missing directory fsyncs do not
/// hide the rest), then inserts and flushes as fast as it can, with no
/// fsync of its own.
fn flush_only_child(data: &Path, before: &str, note: &mut impl FnMut(String)) -> ExitCode {
    let dir = data.join("offsets");
    let open = || {
        std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(&dir)
                .flush_every_ms(None)
                .cache_capacity(sluice::replay::offsets::CACHE_BYTES)
                .open()
        })
    };
    let db = match open() {
        Ok(Ok(db)) => db,
        broken => {
            // What open_or_reset does: set the store aside, start afresh.
            let why = match broken {
                Ok(Err(e)) => e.to_string(),
                _ => "sled panicked".to_string(),
            };
            note(format!("broken open-error {why}"));
            note("epoch".into());
            let aside = data.join(format!("offsets-broken-{}", before.lines().count()));
            std::fs::rename(&dir, &aside).expect("set the broken store aside");
            match open() {
                Ok(Ok(db)) => db,
                _ => return ExitCode::from(3),
            }
        }
    };
    let found = db
        .get(b"committed")
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    // Every name durable (each file of the store, the store's directory
    // and its entry): what is left to sled is only the bytes it writes
    // after this, and its flush.
    for e in std::fs::read_dir(&dir)
        .expect("read the store's dir")
        .flatten()
    {
        if let Ok(f) = std::fs::File::open(e.path()) {
            f.sync_all().expect("fsync a store file");
        }
    }
    sluice::storage::durable::sync_dir(&dir).expect("fsync the store's dir");
    sluice::storage::durable::sync_dir(data).expect("fsync the data dir");
    let promised = promises(before).commit;
    note(format!(
        "open committed={found} promised={promised} fates=0 pins=0 reset=false"
    ));
    if found < promised {
        note(format!(
            "broken rollback committed={found} promised={promised}"
        ));
        note("epoch".into());
        note(format!("commit {found}"));
    }
    if std::env::var_os(VERIFY_ONLY_ENV).is_some() {
        return ExitCode::SUCCESS;
    }
    let mut c = found;
    for step in 0u64.. {
        c += 10;
        db.insert(b"committed", &c.to_be_bytes()).expect("insert");
        db.insert(format!("filler-{}", step % 64), vec![step as u8; 700])
            .expect("filler");
        db.flush().expect("flush");
        note(format!("commit {c}"));
    }
    ExitCode::SUCCESS
}

fn spawn(
    data: &Path,
    journal: &Path,
    log: &Path,
    verify_only: bool,
    flush_only: bool,
) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().expect("this binary"));
    cmd.env(CHILD_ENV, data)
        .env(JOURNAL_ENV, journal)
        .env_remove("POWERCUT_CYCLES")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log"),
        );
    if verify_only {
        cmd.env(VERIFY_ONLY_ENV, "1");
    }
    if flush_only {
        cmd.env(FLUSH_ONLY_ENV, "1");
    }
    cmd.spawn().expect("spawn the sled child")
}

/// `flush_only`: the `sled-flush-only` experiment, whose broken promises
/// are findings about sled, not failures of sluice.
pub fn run(run: &Run, cycles: u64, seed: u64, flush_only: bool) -> Report {
    let mode = if flush_only {
        "sled-flush-only"
    } else {
        "sled"
    };
    let (mut report, mount) = begin(run, mode, cycles);
    let Some(mut mount) = mount else {
        return report;
    };
    let mut rng = Rng(seed | 1);
    let root = &run.root;
    let data = mount.mnt.join("data");
    let journal = root.join("journal.txt");
    let log = root.join("sled.log");
    // How long an open takes, from the journal's timing of the last one.
    let mut open_ms = 50u64;
    for cycle in 0..cycles {
        report.starts += 1;
        let lines_before = std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
            .count();
        let t0 = Instant::now();
        let mut child = spawn(&data, &journal, &log, false, flush_only);
        let inside_open = rng.next() % 3 == 0;
        let wait = if inside_open {
            rng.range(0, open_ms + 1)
        } else {
            rng.range(open_ms, open_ms + 1500)
        };
        let until = t0 + Duration::from_millis(wait);
        let mut opened_at = None;
        while Instant::now() < until {
            if opened_at.is_none() {
                let text = std::fs::read_to_string(&journal).unwrap_or_default();
                if text
                    .lines()
                    .skip(lines_before)
                    .any(|l| l.starts_with("open "))
                {
                    opened_at = Some(t0.elapsed());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                report.failures.push(format!(
                    "cycle {cycle}: the child exited with {status} by itself (see {})",
                    log.display()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        let _ = child.wait();
        if let Some(t) = opened_at {
            open_ms = (t.as_millis() as u64).max(5);
        } else {
            report.killed_starting += 1;
        }
        if !report.failures.is_empty() {
            break;
        }
        if let Err(e) = cut(&mut mount, &mut rng) {
            report.failures.push(format!("cycle {cycle}: {e}"));
            break;
        }
    }
    if report.failures.is_empty() {
        report.starts += 1;
        let status = spawn(&data, &journal, &log, true, flush_only)
            .wait()
            .expect("wait for the sled child");
        if !status.success() {
            report.failures.push(format!(
                "the last open exited with {status} (see {})",
                log.display()
            ));
        }
    }
    report.cut = mount.tally.clone();
    let text = std::fs::read_to_string(&journal).unwrap_or_default();
    let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    let (opens, resets) = (count("open "), count("reset "));
    report.acked = count("commit ");
    report.extra = format!(
        "opens={opens} resets={resets} commits_promised={} fates_promised={} pins_promised={} promises_broken={}",
        report.acked,
        count("fate "),
        count("pin "),
        count("broken ")
    );
    let problems = text.lines().filter(|l| {
        l.starts_with("broken ") || l.starts_with("reset ") || l.starts_with("open-failed")
    });
    if flush_only {
        let sample: Vec<&str> = problems.take(5).collect();
        report.extra = format!("{} first_broken={sample:?}", report.extra);
    } else {
        report.failures.extend(problems.map(str::to_string));
    }
    report
}
