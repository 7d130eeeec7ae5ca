//! Power-cut chaos: the real binary, on real syscalls, on a filesystem
//! that forgets what was not fsynced (tests/powercut-fs). kill -9 keeps the
//! page cache, so `chaos.rs` cannot tell a right fsync order from a missing
//! one; a cut here can.
//!
//! Three modes, each on its own mount, each judged on its own:
//! - `serve` (`powercut/serve.rs`): `sluice serve`'s whole data dir on the
//!   mount, a `sluice dev-broker` child off it (the broker is not cut),
//!   Idempotency-Key clients that retry every request until it has a
//!   definitive answer (`chaos/exactly_once.rs`);
//! - `files`: the same with `[sink] kind = "files"`, the archive dir on the
//!   mount too;
//! - `archive` (`powercut/archive.rs`): `sluice archive` with its dir on the
//!   mount, consuming what a producer off the mount writes the way sluice's
//!   replay does (duplicates, late and unparsed records included);
//! - `sled` (`powercut/sled.rs`): the offset store alone (sled inside) in a
//!   child process, checked against every offset, fate and pin it promised;
//!   `sled-flush-only` (not in the default list: an experiment, whose
//!   broken promises are counted, not failed) trusts sled's own `flush()`.
//!
//! A cycle starts the daemon, loads it for a random while, kills it (-9),
//! cuts (a third of the cuts tear: each unsynced page kept or not, at
//! random), and in a third of the cycles starts it again, kills it at a
//! random early moment (inside recovery) and cuts again. Every start must
//! succeed. At the end a last start drains, and the mode is judged: see
//! each mode's module. One summary line per mode, exit 1 on any failure,
//! the run's directory kept.
//!
//! Off unless `POWERCUT_CYCLES` is set (`make test` runs every test
//! binary): `make powercut CYCLES=N` (N cycles in total, split evenly over
//! the modes) or `make powercut-smoke`. `POWERCUT_MODES` (default
//! `serve,files,archive,sled`), `POWERCUT_SEED`, `POWERCUT_CLIENTS` (default 4),
//! `POWERCUT_TEAR_EVERY` (one cut in N tears; default 3, 0 for none),
//! `POWERCUT_KEEP` (keep every mode's directory, not only a failed one's),
//! `POWERCUT_FS` (the powercut-fs binary; default its release build under
//! tests/powercut-fs/target). Without a usable FUSE it skips, unless
//! `SLUICE_REQUIRE_FUSE=1` (CI), which makes it fail.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

#[path = "powercut/archive.rs"]
mod archive;
// Its mode switches are chaos.rs's; this harness uses its clients and verdict.
#[allow(dead_code)]
#[path = "chaos/exactly_once.rs"]
mod exactly_once;
#[path = "powercut/mount.rs"]
mod mount;
#[path = "powercut/process.rs"]
mod process;
#[path = "archive/recount.rs"]
mod recount;
#[path = "powercut/serve.rs"]
mod serve;
#[path = "chaos/shared.rs"]
mod shared;
#[path = "powercut/sled.rs"]
mod sled;
#[path = "archive/source.rs"]
mod source;
#[path = "support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mount::{CutTally, Mount};
use process::Daemon;
use shared::Rng;

/// The topic every mode produces to or reads from.
const TOPIC: &str = "events";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one mode's run saw, and what was wrong with it.
#[derive(Default)]
pub struct Report {
    pub mode: &'static str,
    pub cycles: u64,
    /// Daemon processes started, and how many of them were killed inside
    /// their start (at a random moment within the time the cycle's start
    /// took to serve, recovery included).
    pub starts: u64,
    pub killed_starting: u64,
    pub cut: CutTally,
    /// Acknowledged events (serve, files) or produced records (archive).
    pub acked: usize,
    /// Acknowledged events found at the end (after the consumer rule).
    pub delivered: usize,
    pub lost: usize,
    pub duplicates: u64,
    /// Records found that no client was told were accepted.
    pub unacknowledged: usize,
    /// `lost_records` summed over the `/stats` of every serving process,
    /// and the ranges the logs name.
    pub lost_records: u64,
    pub lost_ranges: Vec<(u64, u64)>,
    pub receipts_checked: u64,
    /// Mode-specific figures, `key=value` separated by spaces.
    pub extra: String,
    pub failures: Vec<String>,
    pub seconds: f64,
}

impl Report {
    fn line(&self) -> String {
        // Each process that reads across a lost range logs it again (the
        // first as recovery found it, later ones as `missing`): count each
        // range once.
        let ranges: std::collections::BTreeSet<&(u64, u64)> = self.lost_ranges.iter().collect();
        let ranges: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
        format!(
            "powercut: mode={} cycles={} starts={} killed_starting={} cuts={} tears={} \
             files_reverted={} pages_dropped={} pages_kept={} dirs_reverted={} \
             acknowledged={} delivered={} lost={} duplicates={} unacknowledged_delivered={} \
             lost_records={} lost_seqs_logged={ranges} receipts_checked={} {}failures={} seconds={:.0}",
            self.mode,
            self.cycles,
            self.starts,
            self.killed_starting,
            self.cut.cuts,
            self.cut.tears,
            self.cut.effect("files_reverted"),
            self.cut.effect("pages_dropped"),
            self.cut.effect("pages_kept"),
            self.cut.effect("dirs_reverted"),
            self.acked,
            self.delivered,
            self.lost,
            self.duplicates,
            self.unacknowledged,
            self.lost_records,
            self.receipts_checked,
            if self.extra.is_empty() {
                String::new()
            } else {
                format!("{} ", self.extra)
            },
            self.failures.len(),
            self.seconds
        )
    }
}

/// The power cut after a kill (every process on the mount reaped): one
/// cut in `POWERCUT_TEAR_EVERY` (default 3; 0: none) tears.
fn cut(mount: &mut Mount, rng: &mut Rng) -> Result<String, String> {
    static EVERY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let every = *EVERY.get_or_init(|| env_or("POWERCUT_TEAR_EVERY", 3));
    let tear = (every > 0 && rng.next() % every == 0).then(|| rng.next());
    mount.cut(tear)
}

/// A cycle's cuts, once its daemon was killed and reaped: a cut, then in a
/// third of the cycles a cut inside recovery: `spawn` starts the daemon,
/// which is killed at a random moment within `start_ms` (how long the
/// cycle's start took), and the mount is cut again. Returns the log of the
/// process killed while starting (empty if none); an error if that start
/// exited by itself or a cut failed.
fn cuts(
    spawn: impl FnOnce() -> Daemon,
    start_ms: u64,
    rng: &mut Rng,
    mount: &mut Mount,
    report: &mut Report,
) -> Result<String, String> {
    cut(mount, rng)?;
    if rng.next() % 3 != 0 {
        return Ok(String::new());
    }
    report.starts += 1;
    let mut d = spawn();
    let until = Instant::now() + Duration::from_millis(rng.range(0, start_ms + 1));
    while Instant::now() < until && d.exited().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    if let Some(status) = d.exited() {
        return Err(format!(
            "a start exited with {status} by itself:\n{}",
            d.log_text()
        ));
    }
    report.killed_starting += 1;
    d.kill_9();
    cut(mount, rng)?;
    Ok(d.log_text())
}

/// A mode's report, and its mount on a fresh backing dir under `run.root`
/// (None, with the failure in the report, if it did not come up).
fn begin(run: &Run, mode: &'static str, cycles: u64) -> (Report, Option<Mount>) {
    let mut report = Report {
        mode,
        cycles,
        ..Report::default()
    };
    match Mount::new(&run.pcfs, &run.root) {
        Ok(m) => (report, Some(m)),
        Err(e) => {
            report.failures.push(e);
            (report, None)
        }
    }
}

/// The files verdict of the files sink and of `sluice archive`: every
/// `expected` id in exactly one line (`lines`: a recount's lines by id),
/// no other id. Counts into `report`, and a failure for each kind of fault.
fn judge_lines(expected: &HashSet<&str>, lines: &HashMap<String, u64>, report: &mut Report) {
    let lost: Vec<_> = expected
        .iter()
        .filter(|id| !lines.contains_key(**id))
        .collect();
    let dup: Vec<_> = lines.iter().filter(|(_, &n)| n > 1).collect();
    let unknown: Vec<_> = lines
        .keys()
        .filter(|id| !expected.contains(id.as_str()))
        .collect();
    report.lost = lost.len();
    report.delivered = expected.len() - lost.len();
    report.duplicates = dup.iter().map(|(_, &n)| n - 1).sum();
    report.unacknowledged = unknown.len();
    for (n, what, sample) in [
        (
            lost.len(),
            "acknowledged ids in no line",
            format!("{:?}", &lost[..lost.len().min(10)]),
        ),
        (
            dup.len(),
            "ids in more than one line",
            format!("{:?}", &dup[..dup.len().min(10)]),
        ),
        (
            unknown.len(),
            "ids in the files that no client was told were accepted",
            format!("{:?}", &unknown[..unknown.len().min(10)]),
        ),
    ] {
        if n > 0 {
            report.failures.push(format!("{n} {what}, e.g. {sample}"));
        }
    }
}

/// Settings every mode gets.
pub struct Run {
    /// The powercut-fs binary.
    pub pcfs: PathBuf,
    pub clients: u64,
    /// Where this mode's mount, logs and ledger go (kept on failure).
    pub root: PathBuf,
}

fn main() -> ExitCode {
    if let Some(data) = std::env::var_os(sled::CHILD_ENV) {
        return sled::child(std::path::Path::new(&data));
    }
    let Some(total) = std::env::var("POWERCUT_CYCLES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        eprintln!("powercut: skipped (set POWERCUT_CYCLES, or run `make powercut` / `make powercut-smoke`)");
        return ExitCode::SUCCESS;
    };
    if let Some(why) = mount::fuse_unusable() {
        if std::env::var("SLUICE_REQUIRE_FUSE").as_deref() == Ok("1") {
            eprintln!(
                "powercut: FAIL: FUSE is required (SLUICE_REQUIRE_FUSE=1) but unusable: {why}"
            );
            return ExitCode::FAILURE;
        }
        eprintln!("powercut: SKIPPED: FUSE is unusable here ({why}); SLUICE_REQUIRE_FUSE=1 makes this a failure");
        return ExitCode::SUCCESS;
    }
    let pcfs = std::env::var_os("POWERCUT_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/powercut-fs/target/release/powercut-fs")
        });
    if !pcfs.is_file() {
        eprintln!(
            "powercut: FAIL: no powercut-fs binary at {} (build it: `make powercut-fs`, or set POWERCUT_FS)",
            pcfs.display()
        );
        return ExitCode::FAILURE;
    }
    let modes: Vec<String> = env_or("POWERCUT_MODES", "serve,files,archive,sled".to_string())
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    if let Some(bad) = modes
        .iter()
        .find(|m| !["serve", "files", "archive", "sled", "sled-flush-only"].contains(&m.as_str()))
    {
        eprintln!(
            "powercut: FAIL: unknown mode {bad:?} in POWERCUT_MODES (serve, files, archive, sled, sled-flush-only)"
        );
        return ExitCode::FAILURE;
    }
    let seed: u64 = env_or(
        "POWERCUT_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let clients: u64 = env_or("POWERCUT_CLIENTS", 4);
    let per_mode = total.div_ceil(modes.len().max(1) as u64).max(1);
    eprintln!(
        "powercut: seed={seed} cycles={total} ({per_mode} per mode: {}) clients={clients} fs={}",
        modes.join(","),
        pcfs.display()
    );
    let mut rng = Rng(seed | 1);
    let mut reports = Vec::new();
    for mode in &modes {
        let dir = tempfile::Builder::new()
            .prefix(&format!("powercut-{mode}-"))
            .tempdir()
            .expect("temp dir");
        let run = Run {
            pcfs: pcfs.clone(),
            clients,
            root: dir.path().to_path_buf(),
        };
        // Each mode draws its own seed, so that one mode replays alone:
        // POWERCUT_MODES=files POWERCUT_SEED=<the printed mode seed>.
        let mode_seed = if modes.len() == 1 { seed } else { rng.next() };
        eprintln!(
            "powercut: mode {mode}: seed={mode_seed} dir={}",
            run.root.display()
        );
        let started = Instant::now();
        let mut report = match mode.as_str() {
            "serve" => serve::run(&run, false, per_mode, mode_seed),
            "files" => serve::run(&run, true, per_mode, mode_seed),
            "archive" => archive::run(&run, per_mode, mode_seed),
            "sled" => sled::run(&run, per_mode, mode_seed, false),
            _ => sled::run(&run, per_mode, mode_seed, true),
        };
        report.seconds = started.elapsed().as_secs_f64();
        println!("{}", report.line());
        for f in &report.failures {
            eprintln!("powercut: {mode}: FAILURE: {f}");
        }
        if !report.failures.is_empty() || std::env::var_os("POWERCUT_KEEP").is_some() {
            eprintln!(
                "powercut: {mode}: logs, ledger and backing dir kept in {}",
                run.root.display()
            );
            let _ = dir.keep();
        }
        reports.push(report);
    }
    let mut all = CutTally::default();
    for r in &reports {
        all.add(&r.cut);
    }
    let failed: usize = reports.iter().map(|r| r.failures.len()).sum();
    println!(
        "powercut: total cycles={} starts={} cuts={} tears={} acknowledged={} lost={} duplicates={} failures={failed} seed={seed}",
        reports.iter().map(|r| r.cycles).sum::<u64>(),
        reports.iter().map(|r| r.starts).sum::<u64>(),
        all.cuts,
        all.tears,
        reports.iter().map(|r| r.acked).sum::<usize>(),
        reports.iter().map(|r| r.lost).sum::<usize>(),
        reports.iter().map(|r| r.duplicates).sum::<u64>(),
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
