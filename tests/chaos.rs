//! The chaos harness: kill -9 a real `sluice serve` over and over while
//! clients load it, then prove that every event that got a 202 reached Kafka.
//!
//! - a `sluice dev-broker` process outlives the daemon restarts;
//! - each cycle starts `sluice serve` (64 KiB segments so rolls and GC run
//!   constantly, debug pause hooks widening the commit/roll/GC windows), runs
//!   several clients mixing single events and batches, records every
//!   acknowledged id in a ledger file, and SIGKILLs the daemon at a seeded
//!   random moment; every third cycle the broker goes down mid-load first;
//! - after the last cycle a final daemon drains the WAL, the topic is
//!   consumed, and the acknowledged ids are checked.
//!
//! Prints one summary line and exits 1 on any loss. `CHAOS_CYCLES` (default
//! 10), `CHAOS_SEED`, `CHAOS_CLIENTS` (default 4). `make chaos CYCLES=200`.
//! `CHAOS_BROKER=kafka` (`make chaos BROKER=kafka`): a real Apache Kafka
//! cluster instead of the dev broker, a broker killed every fifth cycle;
//! see `chaos/broker.rs`.
//! `CHAOS_MODE=exactly-once` (`make chaos MODE=exactly-once`): see
//! `chaos/exactly_once.rs`.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

#[path = "support/apache_kafka.rs"]
#[allow(dead_code)] // the shared cluster and some operations serve other tests
mod apache_kafka;
#[path = "chaos/broker.rs"]
mod broker;
#[path = "chaos/exactly_once.rs"]
mod exactly_once;
#[path = "chaos/shared.rs"]
mod shared;

use shared::{consumer, http, lag, Rng, Seen};

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_sluice");

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wait_file(path: &Path, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        assert!(t0.elapsed() < within, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every caller kills or waits for the child.
#[allow(clippy::zombie_processes)]
fn serve(
    data: &Path,
    brokers: &str,
    partitions_cap: Option<u32>,
    message_timeout_ms: &str,
) -> (Child, String) {
    let addr_file = data.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("serve.log"))
        .unwrap();
    let mut cmd = Command::new(EXE);
    cmd.arg("serve");
    if exactly_once::enabled() {
        let config = data.join("sluice.toml");
        std::fs::write(&config, exactly_once::config()).unwrap();
        cmd.arg("--config").arg(config);
    }
    if let Some(cap) = partitions_cap {
        cmd.env("SLUICE_DEBUG_PARTITIONS_CAP", cap.to_string());
    }
    let child = cmd
        // No admin listener: its fixed default port would clash between parallel daemons.
        .env("SLUICE_HTTP_ADMIN_LISTEN", "")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--brokers",
            brokers,
            "--data-dir",
        ])
        .arg(data.join("data"))
        .arg("--addr-file")
        .arg(&addr_file)
        .env("SLUICE_WAL_SEGMENT_BYTES", "65536")
        .env("SLUICE_WAL_MAX_BYTES", "1073741824")
        .env("SLUICE_WAL_MIN_FREE_BYTES", "0")
        .env("SLUICE_REPLAY_COMMIT_INTERVAL_MS", "20")
        .env("SLUICE_KAFKA_MESSAGE_TIMEOUT_MS", message_timeout_ms)
        .env("SLUICE_REPLAY_BACKOFF_MAX_MS", "500")
        .env("SLUICE_DEBUG_PAUSE", exactly_once::pauses())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = wait_file(&addr_file, Duration::from_secs(60));
    (child, addr)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status();
}

/// A client: posts until the daemon goes away, appending each acknowledged id
/// (with its sequence number) to the ledger.
fn client(
    addr: String,
    tag: String,
    seed: u64,
    ledger: Arc<Mutex<std::fs::File>>,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut rng = Rng(seed | 1);
    let mut acked = 0;
    for r in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let n = if rng.next() % 2 == 0 {
            1
        } else {
            rng.range(2, 60) as usize
        };
        let ids: Vec<String> = (0..n).map(|i| format!("{tag}-r{r}-{i}")).collect();
        let events: Vec<String> = ids
            .iter()
            .map(|id| {
                format!(
                    r#"{{"id":"{id}","tenant_id":"t{}","source":"chaos","message":"m"}}"#,
                    id.len() % 7
                )
            })
            .collect();
        let body = format!("[{}]", events.join(","));
        match http(&addr, "POST", "/v1/events", &body) {
            Ok((202, resp)) => {
                let v: serde_json::Value = serde_json::from_str(&resp).expect("202 body is JSON");
                assert_eq!(v["accepted"], n, "{resp}");
                let first = v["first_seq"].as_u64().unwrap();
                let mut f = ledger.lock().unwrap();
                for (i, id) in ids.iter().enumerate() {
                    writeln!(f, "{id} {}", first + i as u64).unwrap();
                }
                acked += n;
            }
            Ok((503, _)) => std::thread::sleep(Duration::from_millis(20)),
            Ok((status, resp)) => panic!("unexpected {status}: {resp}"),
            Err(_) => break, // killed
        }
    }
    acked
}

fn main() -> ExitCode {
    let cycles: u64 = env_or("CHAOS_CYCLES", 10);
    let clients: u64 = env_or("CHAOS_CLIENTS", 4);
    let seed: u64 = env_or(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().to_path_buf();
    let started = Instant::now();
    eprintln!(
        "chaos: seed={seed} cycles={cycles} clients={clients} dir={}",
        root.display()
    );

    let mut broker = broker::Broker::start(&root);
    let brokers = broker.brokers();
    let timeout_ms = broker.message_timeout_ms(exactly_once::message_timeout_ms());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (b, s, st) = (brokers.clone(), seen.clone(), consumer_stop.clone());
        std::thread::spawn(move || consumer(b, s, st))
    };
    let ledger_path = root.join("ledger.txt");
    let ledger = Arc::new(Mutex::new(std::fs::File::create(&ledger_path).unwrap()));
    // Exactly-once clients keep their unanswered request across kills.
    let eo: Option<Vec<_>> = exactly_once::enabled().then(|| {
        (0..clients)
            .map(|c| exactly_once::Client::new(c, rng.next()))
            .collect()
    });

    for cycle in 0..cycles {
        // Exactly-once mode: the topic "grows" from 8 to 16 partitions
        // halfway, between a kill and the restart (see
        // `SLUICE_DEBUG_PARTITIONS_CAP`): records produced again after it
        // must keep their partition, later ones spread over 16.
        let cap = (exactly_once::enabled() && cycle < cycles / 2).then_some(8);
        let outage = broker.outage_cycle(cycle);
        if outage {
            broker.prepare();
        }
        let (mut daemon, addr) = serve(&root, &brokers, cap, &timeout_ms);
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let (addr, ledger, stop) = (addr.clone(), ledger.clone(), stop.clone());
                let s = rng.next();
                if let Some(eo) = &eo {
                    let state = eo[c as usize].clone();
                    return std::thread::spawn(move || {
                        exactly_once::run(&addr, &state, &ledger, &stop, false)
                    });
                }
                std::thread::spawn(move || client(addr, format!("k{cycle}-c{c}"), s, ledger, stop))
            })
            .collect();
        let delay = rng.range(150, 900);
        if outage {
            std::thread::sleep(Duration::from_millis(delay / 2));
            broker.down(&mut rng);
            std::thread::sleep(Duration::from_millis(delay / 2));
        } else {
            std::thread::sleep(Duration::from_millis(delay));
        }
        daemon.kill().unwrap(); // SIGKILL
        daemon.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("client thread");
        }
        if outage {
            broker.up();
        }
    }

    // Drain: a last daemon runs until replay has caught up, then stops cleanly.
    // Against the real cluster, with every broker back first.
    broker.prepare();
    let (mut daemon, addr) = serve(&root, &brokers, None, &timeout_ms);
    // Every request cut by a kill gets its definitive answer now.
    let (mut retries, mut replayed) = (0, 0);
    for state in eo.iter().flatten() {
        exactly_once::run(&addr, state, &ledger, &AtomicBool::new(true), true);
        let c = state.lock().unwrap();
        retries += c.retries;
        replayed += c.replayed;
    }
    let t0 = Instant::now();
    while lag(&addr) != Some(0) {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "replay did not catch up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(daemon.id(), "TERM");
    let clean = daemon.wait().unwrap().success();

    drop(ledger);
    let mut acked: HashMap<String, u64> = HashMap::new();
    for line in BufReader::new(std::fs::File::open(&ledger_path).unwrap()).lines() {
        let line = line.unwrap();
        let (id, seq) = line.split_once(' ').unwrap();
        acked.insert(id.to_string(), seq.parse().unwrap());
    }
    consumer_stop.store(true, Ordering::Relaxed);
    reader.join().expect("consumer thread");
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    let incomplete = seen.ids.remove("__incomplete__").is_some();
    let consumed = seen.ids;
    let n: u64 = consumed.values().sum();
    let broker_kind = broker::kind();
    let broker_kills = broker.kills();
    broker.stop();

    if eo.is_some() {
        let v = exactly_once::verdict(&acked, &seen.raw);
        println!(
            "chaos: mode=exactly-once broker={broker_kind} broker_kills={broker_kills} cycles={cycles} acknowledged={} lost={} duplicates={} delivered_unacknowledged={} order_violations={} raw_duplicates={} dropped_by_rule={} client_retries={retries} replayed_answers={replayed} consumed_records={n} clean_final_stop={clean} seed={seed} seconds={:.0}",
            acked.len(),
            v.lost,
            v.duplicates,
            v.unacknowledged,
            v.order_violations,
            v.raw_duplicates,
            v.dropped_by_rule,
            started.elapsed().as_secs_f64()
        );
        // The growth took effect: records above the boundary use the
        // partitions the cap hid.
        let grown = seen.raw.iter().filter(|r| r.partition >= 8).count();
        println!("chaos: records on partitions 8-15 (after the growth) = {grown}");
        if cycles >= 2 && grown == 0 {
            eprintln!("the partition-count change never took effect");
            return ExitCode::from(1);
        }
        let bad = v.lost + v.unacknowledged + v.duplicates as usize + v.order_violations as usize;
        for (id, seqs) in v.repeated.iter().take(10) {
            eprintln!(
                "DUPLICATE after the rule: {id} at seqs {seqs:?} (acknowledged as {:?})",
                acked.get(id)
            );
        }
        if incomplete || bad > 0 || !clean || acked.is_empty() {
            eprintln!(
                "exactly-once run failed (incomplete read: {incomplete}, clean stop: {clean}); logs kept in {}",
                root.display()
            );
            std::mem::forget(dir);
            return ExitCode::from(1);
        }
        return ExitCode::SUCCESS;
    }
    let lost: Vec<_> = acked
        .keys()
        .filter(|id| !consumed.contains_key(*id))
        .collect();
    let duplicates: u64 = consumed.values().map(|c| c - 1).sum();
    let unacked: HashSet<_> = consumed
        .keys()
        .filter(|id| !acked.contains_key(*id))
        .collect();
    // The consumer rule over the same records: what a deduplicating reader
    // would still see twice (the clients here do not retry, so a repeat is
    // replay's, with the same (instance, seq)).
    let rule = exactly_once::verdict(&acked, &seen.raw);
    println!(
        "chaos: mode=at-least-once broker={broker_kind} broker_kills={broker_kills} cycles={cycles} acknowledged={} lost={} duplicates={duplicates} duplicates_after_rule={} lost_after_rule={} order_violations={} delivered_unacknowledged={} consumed_records={n} clean_final_stop={clean} seed={seed} seconds={:.0}",
        acked.len(),
        lost.len(),
        rule.duplicates,
        rule.lost,
        rule.order_violations,
        unacked.len(),
        started.elapsed().as_secs_f64()
    );
    // An incomplete read (the mock broker evicted message sets before the
    // consumer reached them) makes any loss figure meaningless: say so first.
    if incomplete {
        eprintln!(
            "invalid run: the topic was not read completely, so lost={} is not a verdict; logs kept in {}",
            lost.len(),
            root.display()
        );
        std::mem::forget(dir);
        return ExitCode::from(1);
    }
    if !lost.is_empty() {
        let mut sample: Vec<_> = lost
            .iter()
            .take(10)
            .map(|id| (id.as_str(), acked[id.as_str()]))
            .collect();
        sample.sort_by_key(|(_, s)| *s);
        eprintln!(
            "LOST (id, seq), first 10: {sample:?}; logs kept in {}",
            root.display()
        );
        std::mem::forget(dir);
        return ExitCode::from(1);
    }
    if !clean || acked.is_empty() {
        eprintln!(
            "invalid run: unclean final stop ({}), or nothing acknowledged",
            !clean
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
