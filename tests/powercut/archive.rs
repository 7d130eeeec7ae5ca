//! `sluice archive` under power cuts: its directory on the mount, a
//! `sluice dev-broker` and a producer off it. The producer writes the way
//! sluice's replay does (`archive/source.rs`: `instance` and `seq` headers,
//! every 50th record not JSON, hours out of order, and repeats of the last
//! records with their own seq, as a restarted sluice sends them).
//!
//! Each cycle starts the archiver, produces a few hundred records in
//! bursts and, at a random burst, kills it and cuts (in one cycle of six it
//! stops it cleanly instead, then cuts: a clean stop must leave nothing
//! unsynced that matters); in a third of the cycles it also kills a start
//! at a random early moment and cuts again. The verdict: every start
//! serves and becomes ready; at the end every produced record is in exactly
//! one line of one file, nothing else is, every summary equals a recount of
//! its file, and the last archiver stops cleanly.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::Daemon;
use super::recount::recount;
use super::shared::{http, Rng};
use super::source::{ledger_id, Source};
use super::support::{Broker, EXE};
use super::{begin, cuts, judge_lines, Report, Run, TOPIC};

struct Setup<'a> {
    dir: &'a Path,
    config: &'a Path,
    brokers: &'a str,
    addr_file: &'a Path,
    log: &'a Path,
}

fn spawn(s: &Setup, label: &str) -> Daemon {
    let mut cmd = Command::new(EXE);
    cmd.args(["archive", "--topic", TOPIC, "--listen", "127.0.0.1:0"])
        .args(["--brokers", s.brokers, "--group", "powercut"])
        .arg("--config")
        .arg(s.config)
        .arg("--dir")
        .arg(s.dir)
        .arg("--addr-file")
        .arg(s.addr_file)
        .env("RUST_LOG", "sluice=info")
        // Widen the windows before the checkpoint's rename and around the
        // consumer's offset commit.
        .env("SLUICE_DEBUG_ARCHIVE_PAUSE", "checkpoint=20,kafka=20");
    Daemon::spawn(cmd, s.addr_file, s.log, label)
}

/// Starts an archiver and waits until its group assigned it partitions.
fn start(s: &Setup, label: &str) -> Result<Daemon, String> {
    let mut d = spawn(s, label);
    let addr = d.serving()?;
    let t0 = Instant::now();
    while http(&addr, "GET", "/ready", "").map(|r| r.0).ok() != Some(200) {
        if let Some(status) = d.exited() {
            return Err(format!(
                "exited with {status} before ready:\n{}",
                d.log_text()
            ));
        }
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(format!("never became ready:\n{}", d.log_text()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

pub fn run(run: &Run, cycles: u64, seed: u64) -> Report {
    let (mut report, mount) = begin(run, "archive", cycles);
    let Some(mut mount) = mount else {
        return report;
    };
    let mut rng = Rng(seed | 1);
    let root = &run.root;
    let dir = mount.mnt.join("archive");
    let config = root.join("archive.toml");
    // A short commit interval and idle close, so that checkpoints, seals
    // and reopenings happen all the time; a fast group rejoin.
    std::fs::write(
        &config,
        "[archive]\ncommit-interval-ms = 150\nidle-close-secs = 1\nmax-open-files = 3\n\
         [archive.librdkafka]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
    )
    .expect("config");
    let broker = Broker::start(root, Some(3));
    let setup = Setup {
        dir: &dir,
        config: &config,
        brokers: &broker.addr,
        addr_file: &root.join("addr"),
        log: &root.join("archive.log"),
    };
    let mut src = Source::new(&broker.addr, "i1");
    let mut ledger: Vec<String> = Vec::new();
    let (mut clean_stops, mut repeats) = (0u64, 0u64);

    'cycles: for cycle in 0..cycles {
        report.starts += 1;
        let t0 = Instant::now();
        let mut d = match start(&setup, &format!("cycle {cycle}: start")) {
            Ok(d) => Some(d),
            Err(why) => {
                report
                    .failures
                    .push(format!("cycle {cycle}: the start {why}"));
                break 'cycles;
            }
        };
        // How long this start took to be ready: a start killed "while
        // starting" dies at a random moment within that.
        let start_ms = t0.elapsed().as_millis() as u64;
        let n = rng.range(200, 600);
        let stop_at = rng.range(0, n);
        for i in 0..n {
            let seq = src.next();
            ledger.push(ledger_id("i1", seq));
            if i % 97 == 0 {
                src.duplicate_tail(20);
                repeats += 20;
            }
            if i % 20 == 19 {
                src.flush();
                std::thread::sleep(Duration::from_millis(15));
            }
            if i != stop_at {
                continue;
            }
            let Some(mut a) = d.take() else { continue };
            if cycle % 6 == 5 {
                clean_stops += 1;
                let status = a.stop();
                if !status.success() {
                    report
                        .failures
                        .push(format!("cycle {cycle}: a clean stop exited with {status}"));
                    break 'cycles;
                }
            } else {
                a.kill_9();
            }
            drop(a);
            let killed = cuts(
                || {
                    spawn(
                        &setup,
                        &format!("cycle {cycle}: start killed while starting"),
                    )
                },
                start_ms,
                &mut rng,
                &mut mount,
                &mut report,
            );
            if let Err(e) = killed {
                report.failures.push(format!("cycle {cycle}: {e}"));
                break 'cycles;
            }
        }
        src.flush();
        // A restarted sluice sends again what it had not committed.
        src.duplicate_tail(50);
        repeats += 50;
        drop(d);
    }
    src.flush();
    report.cut = mount.tally.clone();
    report.acked = ledger.len();
    report.extra = format!("clean_stops={clean_stops} repeats_sent={repeats}");
    if !report.failures.is_empty() {
        return report;
    }

    report.starts += 1;
    let mut last = match start(&setup, "the last start") {
        Ok(d) => d,
        Err(why) => {
            report.failures.push(format!("the last start {why}"));
            return report;
        }
    };
    let expected: HashSet<&str> = ledger.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let (lines, problems) = loop {
        let (lines, problems) = recount(&dir);
        let complete = expected.iter().all(|id| lines.contains_key(*id));
        if (complete && problems.is_empty()) || t0.elapsed() > Duration::from_secs(180) {
            break (lines, problems);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = last.stop();
    if !status.success() {
        report.failures.push(format!(
            "the last archiver's clean stop exited with {status}"
        ));
    }
    let (after, after_problems) = recount(&dir);
    if after != lines {
        report
            .failures
            .push("the clean stop changed the files' lines".into());
    }
    judge_lines(&expected, &lines, &mut report);
    for p in problems.iter().chain(&after_problems).take(10) {
        report
            .failures
            .push(format!("summary differs from a recount: {p}"));
    }
    report
}
