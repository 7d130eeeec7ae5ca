//! `sluice archive` as a real process against `sluice dev-broker` (a
//! process too): exactly once into hourly files under kill -9, duplicates
//! produced the way sluice's own restarts produce them (same `instance` and
//! `seq`), late and unparsed records, two archivers in one group, and a Log
//! Pipeline client's JSON and CSV batches through `sluice serve`.
//!
//! Every check recounts the files: each ledger record in exactly one line
//! of exactly one file, and every summary equal to a recount of its file.
//! `ARCHIVE_CHAOS_CYCLES` (default 4) sets the kill -9 cycles;
//! `make chaos-archive CYCLES=N` runs a long one.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

#[path = "../support/mod.rs"]
mod support;

mod recount;
mod reset;
mod source;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;
use recount::recount;
use serde_json::{json, Value};
use source::{ledger_id, Source};
use support::{Broker, EXE};

mod bounds;
mod compression;
mod files_sink_faults;
mod idle_seal;
mod listener;
mod restart;

const TOPIC: &str = "events";
/// Generous: the machine is shared and slow.
const WITHIN: Duration = Duration::from_secs(120);

/// A `sluice archive` child, SIGKILLed on drop.
struct Archiver {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Archiver {
    fn start(dir: &Path, brokers: &str, group: &str, config: &Path) -> Archiver {
        Archiver::start_with(
            dir,
            brokers,
            group,
            config,
            "127.0.0.1:0",
            None,
            Some("sluice=info"),
        )
    }

    /// With `listen`, with `nofile` its open-file limit (`ulimit -n`), and
    /// `rust_log` as `RUST_LOG` (None: unset, the configured level).
    fn start_with(
        dir: &Path,
        brokers: &str,
        group: &str,
        config: &Path,
        listen: &str,
        nofile: Option<u32>,
        rust_log: Option<&str>,
    ) -> Archiver {
        let addr_file = dir.with_extension("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = dir.with_extension(format!("log{}", rand_u64() % 1_000_000));
        let mut cmd = match nofile {
            None => Command::new(EXE),
            Some(n) => {
                // exec: the child's pid is the archiver's.
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), EXE]);
                c
            }
        };
        let mut child = cmd
            .args(["archive", "--topic", TOPIC, "--listen", listen])
            .args(["--brokers", brokers, "--group", group])
            .arg("--config")
            .arg(config)
            .arg("--dir")
            .arg(dir)
            .arg("--addr-file")
            .arg(&addr_file)
            .env_remove("RUST_LOG")
            .envs(rust_log.map(|l| ("RUST_LOG", l)))
            .env("SLUICE_DEBUG_ARCHIVE_PAUSE", "checkpoint=20,kafka=20")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file) {
                if !s.trim().is_empty() {
                    break s.trim().to_string();
                }
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "archive exited {st}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(t0.elapsed() < WITHIN, "archive did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Archiver { child, addr, log }
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.addr, path)
    }

    /// Until the group assigned partitions (the consumer is reading).
    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        while self.get("/ready").0 != 200 {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "archive exited {st}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(t0.elapsed() < WITHIN, "archive never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: a clean stop commits and seals.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let st = self.child.wait().unwrap();
        let _ = std::fs::read_to_string(&self.log);
        st
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Config for the archiver: short commit interval and idle close so
/// sealing and reopening happen during the test, fast group rejoin.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("archive.toml");
    std::fs::write(
        &path,
        format!(
            "[archive]\ncommit-interval-ms = 150\nidle-close-secs = 1\nmax-open-files = 3\n{extra}\n\
             [archive.librdkafka]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n"
        ),
    )
    .unwrap();
    path
}

/// Waits until the archive directories hold every ledger record.
fn wait_complete(dirs: &[&Path], expected: usize) -> HashMap<String, u64> {
    let t0 = Instant::now();
    loop {
        let mut all = HashMap::new();
        for d in dirs {
            for (k, v) in recount(d).0 {
                *all.entry(k).or_default() += v;
            }
        }
        if all.len() >= expected || t0.elapsed() > WITHIN {
            return all;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_exactly_once(all: &HashMap<String, u64>, ledger: &[String]) {
    let lost: Vec<_> = ledger.iter().filter(|id| !all.contains_key(*id)).collect();
    let dup: Vec<_> = all.iter().filter(|(_, &n)| n > 1).collect();
    let extra: Vec<_> = all.keys().filter(|k| !ledger.contains(k)).collect();
    assert!(
        lost.is_empty() && dup.is_empty() && extra.is_empty(),
        "lost {} {:?}, duplicated {} {:?}, unknown {:?}",
        lost.len(),
        &lost[..lost.len().min(5)],
        dup.len(),
        &dup[..dup.len().min(5)],
        &extra[..extra.len().min(5)]
    );
}

/// Wait until the archiver's committed summaries (HTTP) agree with the
/// files on disk; a mismatch after that is a bug.
fn settle(dir: &Path) {
    let t0 = Instant::now();
    loop {
        let (_, problems) = recount(dir);
        if problems.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < WITHIN,
            "summaries never matched the files: {problems:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kill_9_chaos_exactly_once_with_duplicates_late_and_unparsed_records() {
    let cycles: u64 = std::env::var("ARCHIVE_CHAOS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path(), Some(3));
    let cfg = config(tmp.path(), "");
    let dir = tmp.path().join("archive");
    let mut src = Source::new(&broker.addr, "i1");
    let mut ledger = Vec::new();
    let mut kills = 0;
    let t_start = Instant::now();
    for cycle in 0..cycles {
        let mut a = Archiver::start(&dir, &broker.addr, "chaos", &cfg);
        a.wait_ready();
        // Produce in small bursts while the archiver runs, and kill it at a
        // random burst: mid-write, mid-fsync, mid-checkpoint.
        let n = 200 + rand_u64() % 400;
        let kill_at = rand_u64() % n;
        let mut a = Some(a);
        for i in 0..n {
            let seq = src.next();
            ledger.push(ledger_id("i1", seq));
            if i % 97 == 0 {
                src.duplicate_tail(20);
            }
            if i % 20 == 19 {
                src.flush();
                std::thread::sleep(Duration::from_millis(15));
            }
            if i == kill_at {
                let a = a.take().unwrap();
                if cycle % 5 == 4 {
                    // Sometimes a clean stop, which seals every hour.
                    assert!(a.stop().success());
                } else {
                    a.kill_9();
                    kills += 1;
                }
            }
        }
        src.flush();
        // sluice's own restart re-sends what it had not committed.
        src.duplicate_tail(50);
    }
    src.flush();
    let a = Archiver::start(&dir, &broker.addr, "chaos", &cfg);
    let all = wait_complete(&[&dir], ledger.len());
    settle(&dir);
    let (code, metrics) = a.get("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("sluice_archive_duplicates_dropped_total"),
        "{metrics}"
    );
    let (code, body) = a.get("/v1/analytics?from=2026-11-26T10&to=2026-11-26T14");
    assert_eq!(code, 200, "{body}");
    let range: Value = serde_json::from_str(&body).unwrap();
    let parsed = ledger.iter().filter(|l| !l.starts_with("garbage")).count();
    assert_eq!(range["total"], json!(parsed), "{body}");
    a.stop();
    assert_exactly_once(&all, &ledger);
    let unparsed = ledger.len() - parsed;
    eprintln!(
        "archive chaos: {cycles} cycles ({kills} kill -9), {} records ({unparsed} unparsed), \
         0 lost, 0 duplicated, summaries = recount, {:.0} s",
        ledger.len(),
        t_start.elapsed().as_secs_f64()
    );
    // The offline command prints the same as the listener.
    let out = Command::new(EXE)
        .args(["analytics", "--hour", "2026-11-26T12", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let offline: Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = std::fs::read_to_string(dir.join("logs/2026-11-26/12.log.json")).unwrap();
    assert_eq!(offline["total"], json!(file.lines().count()));
}

#[test]
fn two_archivers_in_one_group_split_partitions_and_hand_over_on_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path(), Some(3));
    let cfg = config(tmp.path(), "");
    let (d1, d2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    let a1 = Archiver::start(&d1, &broker.addr, "pair", &cfg);
    let a2 = Archiver::start(&d2, &broker.addr, "pair", &cfg);
    let mut src = Source::new(&broker.addr, "i2");
    let mut ledger = Vec::new();
    let mut produce = |src: &mut Source, n: usize| {
        for _ in 0..n {
            let seq = src.next();
            ledger.push(ledger_id("i2", seq));
        }
        src.flush();
    };
    produce(&mut src, 600);
    let both = wait_complete(&[&d1, &d2], 600);
    assert_eq!(both.len(), 600);
    // Both took part (3 partitions split between two members).
    let (c1, c2) = (recount(&d1).0.len(), recount(&d2).0.len());
    assert!(c1 > 0 && c2 > 0, "one archiver got everything: {c1} / {c2}");
    // A clean stop commits before giving up its partitions; the other
    // archiver continues from exactly there, in its own directory.
    assert!(a1.stop().success());
    produce(&mut src, 600);
    src.duplicate_tail(100);
    src.flush();
    let all = wait_complete(&[&d1, &d2], 1200);
    settle(&d1);
    settle(&d2);
    assert_exactly_once(&all, &ledger);
    let (code, body) = a2.get("/ready");
    assert_eq!(code, 200, "{body}");
    a2.stop();
}

#[test]
fn log_pipeline_client_batches_through_serve_end_in_hourly_files_and_summaries() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path(), Some(3));
    let serve_cfg = tmp.path().join("serve.toml");
    std::fs::write(&serve_cfg, "[events]\nrequired = []\n").unwrap();
    let daemon = support::Serve::new(&tmp.path().join("data"))
        .brokers(&broker.addr)
        .arg("--config")
        .arg(&serve_cfg)
        .start();
    // A Log Pipeline web-log batch as JSON, and one as CSV.
    let json_batch = json!([
        {"timestamp": "2026-11-26T12:01:00Z", "tenant_id": "shop", "source": "nginx",
         "severity": "INFO", "message": "GET /", "path": "/", "userAgent": "Mozilla"},
        {"timestamp": "2026-11-26T12:02:00Z", "tenant_id": "shop", "source": "nginx",
         "severity": "ERROR", "message": "GET /cart", "path": "/cart", "userAgent": "Mozilla"},
        {"timestamp": "2026-11-26T11:59:59Z", "tenant_id": "blog", "source": "nginx",
         "severity": "INFO", "message": "late", "path": "/", "userAgent": "curl"}
    ]);
    let csv = "timestamp,tenant_id,source,severity,message,path,userAgent\n\
               2026-11-26T12:30:00Z,shop,nginx,INFO,GET /,/,Mozilla\n\
               2026-11-26T13:00:00Z,shop,nginx,WARN,GET /slow,/slow,curl\n";
    for (ct, body) in [
        ("application/json", json_batch.to_string()),
        ("text/csv", csv.to_string()),
    ] {
        let status = post(&daemon.addr, ct, &body);
        assert_eq!(status, 202, "{ct}");
    }
    let dir = tmp.path().join("archive");
    let cfg = config(tmp.path(), "");
    let a = Archiver::start(&dir, &broker.addr, "pipeline", &cfg);
    let t0 = Instant::now();
    let h12 = loop {
        let (code, body) = a.get("/v1/analytics?hour=2026-11-26T12");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let h13: Value =
            serde_json::from_str(&a.get("/v1/analytics?hour=2026-11-26T13").1).unwrap();
        if v["total"] == json!(3) && h13["total"] == json!(1) {
            break v;
        }
        assert!(t0.elapsed() < WITHIN, "hour 12: {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(h12["by_tenant"]["counts"], json!({"shop": 3}));
    assert_eq!(h12["by_severity"]["counts"], json!({"INFO": 2, "ERROR": 1}));
    assert_eq!(h12["top"]["path"][0], json!({"value": "/", "count": 2}));
    let h11: Value = serde_json::from_str(&a.get("/v1/analytics?hour=2026-11-26T11").1).unwrap();
    assert_eq!(h11["total"], json!(1));
    let lines = std::fs::read_to_string(dir.join("logs/2026-11-26/12.log.json")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    let (code, _) = a.get("/v1/analytics?hour=yesterday");
    assert_eq!(code, 400);
    settle(&dir);
    a.stop();
}

fn post(addr: &str, ct: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /logs HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// `sluice serve` with `[sink] kind = "files"` on `data`, archiving into
/// `archive`: no broker at all.
fn files_sink_serve(tmp: &Path, data: &Path, archive: &Path) -> support::Daemon {
    files_sink(tmp, data, archive, "idle-close-secs = 1\n").start()
}

/// The files sink's `Serve`, with `archive_extra` lines in `[archive]`
/// (`idle-close-secs` among them), before it starts.
fn files_sink(tmp: &Path, data: &Path, archive: &Path, archive_extra: &str) -> support::Serve {
    let cfg = tmp.join("files-sink.toml");
    std::fs::write(
        &cfg,
        format!(
            "[events]\nrequired = []\n[sink]\nkind = \"files\"\n\
             [archive]\ndir = {:?}\nmax-open-files = 3\n{archive_extra}",
            archive.display().to_string()
        ),
    )
    .unwrap();
    support::Serve::new(data).arg("--config").arg(&cfg).envs(&[
        ("RUST_LOG", "sluice=info"),
        // Widen the windows before the checkpoint's rename and between
        // the checkpoint and the offset flush.
        ("SLUICE_DEBUG_ARCHIVE_PAUSE", "checkpoint=20"),
        ("SLUICE_DEBUG_PAUSE", "flush=20"),
    ])
}

/// POST /logs; 0 when the connection fails or is cut (the daemon died):
/// then the batch is not acknowledged.
fn try_post(addr: &str, ct: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    if write!(
        s,
        "POST /logs HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .is_err()
    {
        return 0;
    }
    let mut out = String::new();
    if s.read_to_string(&mut out).is_err() {
        return 0;
    }
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn files_sink_under_kill_9_keeps_every_acknowledged_event_exactly_once() {
    let cycles: u64 = std::env::var("ARCHIVE_CHAOS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    // Acknowledged (202) and attempted-but-unacknowledged event ids.
    let mut acked: Vec<String> = Vec::new();
    let mut unacked: Vec<String> = Vec::new();
    let mut next = 0u64;
    let mut kills = 0;
    let t_start = Instant::now();
    for _ in 0..cycles {
        let daemon = files_sink_serve(tmp.path(), &data, &dir);
        // SIGKILL from another thread at a random moment: mid-request,
        // mid-append, mid-fsync, mid-checkpoint, mid-offset-flush.
        let pid = daemon.pid();
        let delay = Duration::from_millis(150 + rand_u64() % 900);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = Command::new("kill").args(["-9", &pid]).status();
        });
        loop {
            let ids: Vec<String> = (0..10)
                .map(|_| {
                    next += 1;
                    format!("w-{next}")
                })
                .collect();
            let events: Vec<Value> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    // Mostly hour 12, some late (hour 11) and some of 13.
                    let hour = [12, 12, 12, 11, 13][(next as usize + i) % 5];
                    json!({"id": id, "timestamp": format!("2026-11-26T{hour}:{:02}:00Z", i * 5),
                           "tenant_id": format!("t{}", i % 3), "source": "web",
                           "severity": "INFO", "message": "m", "path": "/p"})
                })
                .collect();
            let code = try_post(&daemon.addr, "application/json", &json!(events).to_string());
            if code == 202 {
                acked.extend(ids);
            } else {
                assert_eq!(code, 0, "refused while up: {}", daemon.log_text());
                unacked.extend(ids);
                break;
            }
        }
        killer.join().unwrap();
        let mut daemon = daemon;
        assert!(daemon.wait_exit(WITHIN).is_some());
        kills += 1;
    }
    // Restart and let replay drain the WAL into the files.
    let daemon = files_sink_serve(tmp.path(), &data, &dir);
    let t0 = Instant::now();
    let all = loop {
        let all = recount(&dir).0;
        if acked.iter().all(|id| all.contains_key(id)) {
            break all;
        }
        assert!(
            t0.elapsed() < WITHIN,
            "not drained: {} of {} acknowledged in the files\n{}",
            acked.iter().filter(|id| all.contains_key(*id)).count(),
            acked.len(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    settle(&dir);
    let dup: Vec<_> = all.iter().filter(|(_, &n)| n > 1).collect();
    let unknown: Vec<_> = all
        .keys()
        .filter(|k| !acked.contains(k) && !unacked.contains(k))
        .collect();
    assert!(dup.is_empty(), "duplicated: {dup:?}");
    assert!(unknown.is_empty(), "never sent: {unknown:?}");
    // The operator's view of this mode.
    assert_eq!(http_get(&daemon.addr, "/health").0, 200);
    let (code, body) = http_get(&daemon.addr, "/ready");
    assert_eq!(code, 200, "{body}");
    let (code, metrics) = http_get(&daemon.addr, "/metrics");
    assert_eq!(code, 200);
    for m in [
        "sluice_sink_down 0",
        "sluice_sink_lines_total",
        "sluice_sink_fsyncs_total",
        "sluice_sink_checkpointed_skipped_total",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }
    let skipped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_sink_checkpointed_skipped_total "))
        .unwrap_or("?")
        .to_string();
    // A clean stop seals every hour; the files still match the ledger.
    assert!(daemon.stop().success());
    settle(&dir);
    let after = recount(&dir).0;
    assert_eq!(after, all, "a clean stop changed the files");
    let extra = all.len() - acked.len();
    eprintln!(
        "files sink chaos: {kills} kill -9 cycles, {} acknowledged, 0 lost, 0 duplicated, \
         {extra} unacknowledged that landed once, {skipped} already checkpointed at the last start, \
         summaries = recount, {:.0} s",
        acked.len(),
        t_start.elapsed().as_secs_f64()
    );
}

#[test]
fn files_sink_takes_log_pipeline_json_and_csv_batches_without_kafka() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    let daemon = files_sink_serve(tmp.path(), &data, &dir);
    let json_batch = json!([
        {"id": "j1", "timestamp": "2026-11-26T12:01:00Z", "tenant_id": "shop", "source": "nginx",
         "severity": "INFO", "message": "GET /", "path": "/", "userAgent": "Mozilla"},
        {"id": "j2", "timestamp": "2026-11-26T12:02:00Z", "tenant_id": "shop", "source": "nginx",
         "severity": "ERROR", "message": "GET /cart", "path": "/cart", "userAgent": "Mozilla"},
        {"id": "j3", "timestamp": "2026-11-26T11:59:59Z", "tenant_id": "blog", "source": "nginx",
         "severity": "INFO", "message": "late", "path": "/", "userAgent": "curl"}
    ]);
    let csv = "id,timestamp,tenant_id,source,severity,message,path,userAgent\n\
               c1,2026-11-26T12:30:00Z,shop,nginx,INFO,GET /,/,Mozilla\n\
               c2,2026-11-26T13:00:00Z,shop,nginx,WARN,GET /slow,/slow,curl\n";
    assert_eq!(
        post(&daemon.addr, "application/json", &json_batch.to_string()),
        202
    );
    assert_eq!(post(&daemon.addr, "text/csv", csv), 202);
    let t0 = Instant::now();
    while recount(&dir).0.len() < 5 {
        assert!(t0.elapsed() < WITHIN, "{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Restart mid-hour: the next start neither repeats nor loses a line.
    daemon.kill_9();
    let daemon = files_sink_serve(tmp.path(), &data, &dir);
    assert_eq!(
        post(
            &daemon.addr,
            "application/json",
            &json!([{"id": "j4", "timestamp": "2026-11-26T12:45:00Z", "tenant_id": "shop",
                     "source": "nginx", "severity": "INFO", "message": "again", "path": "/",
                     "userAgent": "Mozilla"}])
            .to_string()
        ),
        202
    );
    let t0 = Instant::now();
    while recount(&dir).0.len() < 6 {
        assert!(t0.elapsed() < WITHIN, "{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.stop().success());
    settle(&dir);
    let (ids, _) = recount(&dir);
    let mut ids: Vec<_> = ids.into_iter().collect();
    ids.sort();
    let want: Vec<(String, u64)> = ["c1", "c2", "j1", "j2", "j3", "j4"]
        .iter()
        .map(|s| (s.to_string(), 1))
        .collect();
    assert_eq!(ids, want);
    let summary = |hh: &str| -> Value {
        serde_json::from_slice(
            &std::fs::read(dir.join(format!("analytics/2026-11-26/summary_{hh}.json"))).unwrap(),
        )
        .unwrap()
    };
    let h12 = summary("12");
    assert_eq!(h12["total"], json!(4), "{h12}");
    assert_eq!(h12["by_tenant"]["counts"], json!({"shop": 4}));
    assert_eq!(h12["by_severity"]["counts"], json!({"INFO": 3, "ERROR": 1}));
    assert_eq!(summary("11")["total"], json!(1));
    assert_eq!(summary("13")["total"], json!(1));
    let lines = std::fs::read_to_string(dir.join("logs/2026-11-26/12.log.json")).unwrap();
    assert_eq!(lines.lines().count(), 4);
}
