//! `sluice serve` under power cuts, into Kafka (a `sluice dev-broker` off
//! the mount) or, with `files`, into `[sink] kind = "files"` with the
//! archive dir on the mount.
//!
//! The verdict:
//! - every start serves (an exit or a hang before serving is a failure);
//! - receipts tell the truth: at every start, a sample of acknowledged
//!   seqs (the latest among them) is `durable` and `pending` or
//!   `delivered`; after the drain every acknowledged seq is `delivered`;
//! - `lost_records`: no range a "WAL records lost" log line names holds an
//!   acknowledged seq, and the sum of the ranges the serving processes
//!   logged equals the sum of their `/stats` `lost_records` (processes
//!   killed inside recovery log ranges that no `/stats` ever showed: the
//!   ranges are the authority, the sum a cross-check; every process that
//!   reads across a lost range counts it again, so the sum exceeds the
//!   distinct seqs, `lost_seqs_logged`);
//! - Kafka: after the consumer rule (first occurrence of (instance, seq)
//!   per partition, `chaos/exactly_once.rs`) every acknowledged id exactly
//!   once, nothing that was not acknowledged, first occurrences in rising
//!   seq;
//! - files: every acknowledged id in exactly one line, nothing else, every
//!   summary equal to a recount of its file, before and after a clean stop;
//! - the last daemon stops cleanly (exit 0).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::exactly_once;
use super::process::{lost_ranges, Daemon};
use super::recount::recount;
use super::shared::{consumer, http, lag, Rng, Seen};
use super::support::{Broker, EXE};
use super::{begin, cuts, judge_lines, Report, Run};

/// Pause hooks (debug builds): widen the windows between a group commit's
/// write and its fdatasync, a roll's rename and its directory fsync, the
/// offset flush and GC, and confirmed deliveries and the offset flush.
const PAUSES: &str = "commit=1,roll=10,gc=10,flush=15";

struct Setup<'a> {
    files: bool,
    data: &'a Path,
    config: &'a Path,
    brokers: Option<&'a str>,
    addr_file: &'a Path,
    log: &'a Path,
    ledger: &'a Path,
    archive: &'a Path,
}

fn spawn(s: &Setup, label: &str) -> Daemon {
    let mut cmd = Command::new(EXE);
    cmd.arg("serve")
        .arg("--config")
        .arg(s.config)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(s.data)
        .arg("--addr-file")
        .arg(s.addr_file);
    if let Some(b) = s.brokers {
        cmd.args(["--brokers", b]);
    }
    cmd.env("SLUICE_HTTP_ADMIN_LISTEN", "")
        .env("SLUICE_WAL_SEGMENT_BYTES", "65536")
        .env("SLUICE_WAL_MAX_BYTES", "1073741824")
        .env("SLUICE_WAL_MIN_FREE_BYTES", "0")
        .env("SLUICE_REPLAY_COMMIT_INTERVAL_MS", "20")
        .env("SLUICE_KAFKA_MESSAGE_TIMEOUT_MS", "2000")
        .env("SLUICE_REPLAY_BACKOFF_MAX_MS", "500")
        .env("SLUICE_DEBUG_PAUSE", PAUSES)
        .env("RUST_LOG", "sluice=info");
    if s.files {
        cmd.env("SLUICE_DEBUG_ARCHIVE_PAUSE", "checkpoint=20");
    }
    Daemon::spawn(cmd, s.addr_file, s.log, label)
}

fn config(files: bool, archive: &Path) -> String {
    let mut c = String::new();
    if files {
        c.push_str(&format!(
            "[sink]\nkind = \"files\"\n[archive]\ndir = {:?}\nmax-open-files = 3\nidle-close-secs = 1\n",
            archive.display().to_string()
        ));
    }
    // A second stream whose events carry no key (see exactly_once).
    c.push_str(exactly_once::config());
    c
}

fn read_ledger(path: &Path) -> Vec<(String, u64)> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let (id, seq) = l.split_once(' ')?;
            Some((id.to_string(), seq.parse().ok()?))
        })
        .collect()
}

/// The receipt of `seq`: (status, durable), or why there is none.
fn receipt(addr: &str, seq: u64) -> Result<(String, bool), String> {
    let (code, body) = http(addr, "GET", &format!("/v1/receipts/{seq}"), "")
        .map_err(|e| format!("GET /v1/receipts/{seq}: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("receipt {seq}: {code} {body}: {e}"))?;
    Ok((
        v["status"].as_str().unwrap_or("").to_string(),
        v["durable"].as_bool().unwrap_or(false),
    ))
}

/// `/stats`: the WAL's `lost_records` and replay's durable `committed`.
fn stats(addr: &str) -> Option<(u64, u64)> {
    let (code, body) = http(addr, "GET", "/stats", "").ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((
        v["wal"]["lost_records"].as_u64()?,
        v["replay"]["committed"].as_u64()?,
    ))
}

/// The committed offset the log's "WAL recovered" line names: what the
/// offset store held when this process opened it.
fn recovered_committed(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("WAL recovered"))?;
    let at = line.find(" committed=")? + " committed=".len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Holds the committed offset a process reported as durable before it was
/// killed, until a later process says what the store held after the cut.
#[derive(Default)]
struct OffsetWatch {
    promised: Option<(u64, u64)>,
    checked: u64,
    rolled_back: Vec<String>,
}

impl OffsetWatch {
    fn observe(&mut self, log: &str) {
        let (Some((cycle, promised)), Some(found)) = (self.promised, recovered_committed(log))
        else {
            return;
        };
        self.checked += 1;
        if found < promised {
            self.rolled_back.push(format!(
                "cycle {cycle}: the committed offset was {promised} (durable, per /stats) before the kill; after the cut the store held {found}"
            ));
        }
        self.promised = None;
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

pub fn run(run: &Run, files: bool, cycles: u64, seed: u64) -> Report {
    let (mut report, mount) = begin(run, if files { "files" } else { "serve" }, cycles);
    let Some(mut mount) = mount else {
        return report;
    };
    let mut rng = Rng(seed | 1);
    let root = &run.root;
    let data = mount.mnt.join("data");
    let archive = mount.mnt.join("archive");
    let config_path = root.join("sluice.toml");
    let ledger_path = root.join("ledger.txt");
    std::fs::write(&config_path, config(files, &archive)).expect("config");
    let broker = (!files).then(|| Broker::start(root, Some(16)));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let reader = broker.as_ref().map(|b| {
        let (b, s, st) = (b.addr.clone(), seen.clone(), consumer_stop.clone());
        std::thread::spawn(move || consumer(b, s, st))
    });
    let setup = Setup {
        files,
        data: &data,
        config: &config_path,
        brokers: broker.as_ref().map(|b| b.addr.as_str()),
        addr_file: &root.join("addr"),
        log: &root.join("serve.log"),
        ledger: &ledger_path,
        archive: &archive,
    };
    let ledger = Arc::new(Mutex::new(
        std::fs::File::create(&ledger_path).expect("ledger"),
    ));
    let clients: Vec<_> = (0..run.clients)
        .map(|c| exactly_once::Client::new(c, rng.next()))
        .collect();
    let mut serving_logs = Vec::new();
    let mut stats_lost_sum = 0u64;
    let mut offsets = OffsetWatch::default();

    'cycles: for cycle in 0..cycles {
        report.starts += 1;
        let t0 = Instant::now();
        let mut d = spawn(&setup, &format!("cycle {cycle}: start"));
        let addr = match d.serving() {
            Ok(a) => a,
            Err(why) => {
                report
                    .failures
                    .push(format!("cycle {cycle}: the start {why}"));
                break 'cycles;
            }
        };
        // How long this start took to serve: a start killed "while
        // starting" dies at a random moment within that.
        let start_ms = t0.elapsed().as_millis() as u64;
        offsets.observe(&d.log_text());
        // Receipts of acknowledged seqs, the latest ones first: the ones
        // the cut was most likely to touch.
        let acked = read_ledger(&ledger_path);
        let sample = acked
            .iter()
            .rev()
            .take(8)
            .chain((0..8).filter_map(|_| acked.get(rng.next() as usize % acked.len().max(1))));
        for (id, seq) in sample {
            report.receipts_checked += 1;
            match receipt(&addr, *seq) {
                Ok((status, true)) if status == "pending" || status == "delivered" => {}
                Ok((status, durable)) => report.failures.push(format!(
                    "cycle {cycle}: the receipt of acknowledged seq {seq} ({id}) says {status}, durable {durable}"
                )),
                Err(e) => report.failures.push(format!("cycle {cycle}: {e}")),
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = clients
            .iter()
            .map(|c| {
                let (addr, c, ledger, stop) =
                    (addr.clone(), c.clone(), ledger.clone(), stop.clone());
                std::thread::spawn(move || exactly_once::run(&addr, &c, &ledger, &stop, false))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.range(200, 1500)));
        let now = stats(&addr);
        d.kill_9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            if let Err(p) = t.join() {
                report
                    .failures
                    .push(format!("cycle {cycle}: a client: {}", panic_text(p)));
            }
        }
        match now {
            Some((lost, committed)) => {
                stats_lost_sum += lost;
                offsets.promised = Some((cycle, committed));
            }
            None => report
                .failures
                .push(format!("cycle {cycle}: GET /stats failed while serving")),
        }
        serving_logs.push(d.log_text());
        drop(d);
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
        match killed {
            Ok(log) => offsets.observe(&log),
            Err(e) => {
                report.failures.push(format!("cycle {cycle}: {e}"));
                break 'cycles;
            }
        }
    }

    // The drain: every request still without an answer gets its definitive
    // one, replay catches up, then a clean stop.
    if report.failures.is_empty() {
        drain(
            &setup,
            &clients,
            &ledger,
            &mut report,
            &mut serving_logs,
            &mut stats_lost_sum,
            &mut offsets,
        );
    }
    report.cut = mount.tally.clone();
    report.failures.append(&mut offsets.rolled_back);
    let all_log = std::fs::read_to_string(setup.log).unwrap_or_default();
    let resets = all_log.matches("OFFSET STORE RESET").count();
    let acked: HashMap<String, u64> = read_ledger(&ledger_path).into_iter().collect();
    report.acked = acked.len();

    // lost_records: which ranges the logs name, whether they hold an
    // acknowledged seq, and whether /stats agreed.
    report.lost_ranges = lost_ranges(&all_log);
    let acked_seqs: HashSet<u64> = acked.values().copied().collect();
    for &(a, b) in &report.lost_ranges {
        if let Some(s) = (a..=b).find(|s| acked_seqs.contains(s)) {
            report.failures.push(format!(
                "a \"WAL records lost\" range {a}..={b} holds acknowledged seq {s}"
            ));
        }
    }
    report.lost_records = stats_lost_sum;
    let logged: u64 = serving_logs
        .iter()
        .flat_map(|l| lost_ranges(l))
        .map(|(a, b)| b - a + 1)
        .sum();
    if logged != stats_lost_sum {
        report.failures.push(format!(
            "serving processes logged {logged} lost records but their /stats said {stats_lost_sum}"
        ));
    }

    if files {
        judge_files(&archive, &acked, &mut report);
    } else {
        consumer_stop.store(true, Ordering::Relaxed);
        if let Some(r) = reader {
            if r.join().is_err() {
                report.failures.push("the topic reader panicked".into());
            }
        }
        let mut seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
        if seen.ids.remove("__incomplete__").is_some() {
            report
                .failures
                .push("the topic was not read completely: no verdict".into());
        }
        let v = exactly_once::verdict(&acked, &seen.raw);
        report.lost = v.lost;
        report.duplicates = v.duplicates;
        report.unacknowledged = v.unacknowledged;
        report.delivered = acked.len() - v.lost;
        report.extra = format!(
            "raw_duplicates={} dropped_by_rule={} order_violations={}",
            v.raw_duplicates, v.dropped_by_rule, v.order_violations
        );
        let read: HashSet<&str> = seen.raw.iter().map(|r| r.id.as_str()).collect();
        let lost: Vec<_> = acked
            .iter()
            .filter(|(id, _)| !read.contains(id.as_str()))
            .take(10)
            .collect();
        if v.lost > 0 {
            report.failures.push(format!(
                "{} acknowledged events lost, e.g. {lost:?}",
                v.lost
            ));
        }
        // A repeat whose other copies carry seqs no 202 ever named is what
        // survived of a write torn before its fdatasync, sent again by the
        // client's retry (see docs/reliability.md, "Power cut").
        let unacked_copies: usize = v
            .repeated
            .iter()
            .map(|(id, seqs)| seqs.iter().filter(|s| acked.get(id) != Some(s)).count())
            .sum();
        let torn_only = v.repeated.iter().all(|(id, seqs)| {
            seqs.iter().filter(|s| acked.get(id) == Some(*s)).count() == 1
                && seqs
                    .iter()
                    .all(|s| acked.get(id) == Some(s) || !acked_seqs.contains(s))
        });
        report.extra = format!(
            "{} repeated_copies_never_acknowledged={unacked_copies} all_repeats_torn_survivors={torn_only}",
            report.extra
        );
        if !v.repeated.is_empty() {
            let sample: Vec<_> = v.repeated.iter().take(5).collect();
            report.failures.push(format!(
                "ids kept more than once (id, seqs of the copies; acknowledged seq per the ledger), e.g. {:?}",
                sample
                    .iter()
                    .map(|(id, seqs)| (id, seqs, acked.get(id)))
                    .collect::<Vec<_>>()
            ));
        }
        if v.duplicates > 0 || v.unacknowledged > 0 || v.order_violations > 0 {
            report.failures.push(format!(
                "after the consumer rule: {} duplicates, {} unacknowledged, {} order violations",
                v.duplicates, v.unacknowledged, v.order_violations
            ));
        }
    }
    let (mut retries, mut replayed) = (0, 0);
    for c in &clients {
        let c = c.lock().unwrap_or_else(|p| p.into_inner());
        retries += c.retries;
        replayed += c.replayed;
    }
    report.extra = format!(
        "{} offsets_checked_after_cut={} offset_store_resets={resets} client_retries={retries} replayed_answers={replayed}",
        report.extra, offsets.checked
    )
        .trim()
        .to_string();
    report
}

fn drain(
    setup: &Setup,
    clients: &[Arc<Mutex<exactly_once::Client>>],
    ledger: &Mutex<std::fs::File>,
    report: &mut Report,
    serving_logs: &mut Vec<String>,
    stats_lost_sum: &mut u64,
    offsets: &mut OffsetWatch,
) {
    report.starts += 1;
    let mut d = spawn(setup, "the drain");
    let addr = match d.serving() {
        Ok(a) => a,
        Err(why) => {
            report.failures.push(format!("the last start {why}"));
            return;
        }
    };
    offsets.observe(&d.log_text());
    for c in clients {
        exactly_once::run(&addr, c, ledger, &AtomicBool::new(true), true);
    }
    let t0 = Instant::now();
    while lag(&addr) != Some(0) {
        if t0.elapsed() > Duration::from_secs(300) {
            report
                .failures
                .push("replay did not catch up within 300 s".into());
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (id, seq) in read_ledger(setup.ledger) {
        report.receipts_checked += 1;
        match receipt(&addr, seq) {
            Ok((status, true)) if status == "delivered" => {}
            Ok((status, durable)) => report.failures.push(format!(
                "after the drain, the receipt of acknowledged seq {seq} ({id}) says {status}, durable {durable}"
            )),
            Err(e) => report.failures.push(e),
        }
    }
    if setup.files {
        // Summaries are committed with the sink's checkpoint: wait until
        // they agree with the files.
        let t0 = Instant::now();
        while !recount(setup.archive).1.is_empty() && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    match stats(&addr) {
        Some((lost, _)) => *stats_lost_sum += lost,
        None => report
            .failures
            .push("GET /stats failed at the drain".into()),
    }
    let status = d.stop();
    serving_logs.push(d.log_text());
    if !status.success() {
        report
            .failures
            .push(format!("the last daemon's clean stop exited with {status}"));
    }
}

fn judge_files(archive: &Path, acked: &HashMap<String, u64>, report: &mut Report) {
    let (lines, problems) = recount(archive);
    let expected: HashSet<&str> = acked.keys().map(String::as_str).collect();
    judge_lines(&expected, &lines, report);
    report.extra = format!("lines={}", lines.values().sum::<u64>());
    if !problems.is_empty() {
        report.failures.push(format!(
            "summaries differ from a recount: {:?}",
            &problems[..problems.len().min(10)]
        ));
    }
}
