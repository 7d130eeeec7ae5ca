//! Two `sluice archive` processes in one group on the shared cluster, with
//! Apache Kafka's own group coordinator: static membership on (the
//! default), `session.timeout.ms` 6 s (the broker's minimum). One archiver
//! is killed with SIGKILL twice: once left down until the group expires it
//! (the other takes its partitions), then restarted; once restarted at
//! once, within the session timeout (a static member replaces its previous
//! incarnation without a rebalance). Every acknowledged event must be in
//! exactly one line across both directories, except the documented window
//! (README, "Archive": an archiver killed between its checkpoint and its
//! Kafka commit whose partitions move before it restarts).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice::replay::partition::partition_for;

use crate::common::{light_load, serve_to, WITHIN};
use crate::support::apache_kafka::shared;
use crate::support::EXE;
use crate::{http, wait_delivered};

const TOPIC: &str = "arch";
const PARTITIONS: u32 = 6;
const GROUP: &str = "arch-group";
const SESSION_MS: u64 = 6_000;
/// `archive.commit-records`: the documented window is at most this many
/// records per kill.
const COMMIT_RECORDS: usize = 500;

/// One `sluice archive` process on a directory, SIGKILLed on drop. Each
/// incarnation logs to its own file.
struct Archiver {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Archiver {
    fn start(dir: &Path, n: u32, bootstrap: &str, config: &Path) -> Archiver {
        let addr_file = dir.with_extension("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = dir.with_extension(format!("log.{n}"));
        let mut child = Command::new(EXE)
            .args(["archive", "--topic", TOPIC, "--listen", "127.0.0.1:0"])
            .args(["--brokers", bootstrap, "--group", GROUP, "--config"])
            .arg(config)
            .arg("--dir")
            .arg(dir)
            .arg("--addr-file")
            .arg(&addr_file)
            .env("RUST_LOG", "sluice=info")
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

    /// The partitions of the last assignment this incarnation logged
    /// (empty after a revocation or before any assignment).
    fn holds(&mut self) -> BTreeSet<i32> {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "archive exited {st}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut held = BTreeSet::new();
        for line in text.lines() {
            if line.contains("archive: partitions assigned") {
                held = partitions_in(line);
            } else if line.contains("archive: partitions revoked") {
                held.clear();
            }
        }
        held
    }

    /// `/ready`'s status: 200 while the group assigned it partitions.
    fn ready(&self) -> u16 {
        http(&self.addr, "GET", "/ready", b"").0
    }

    /// Revocations this incarnation logged.
    fn revocations(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("archive: partitions revoked")
            .count()
    }

    fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(self.child.wait().unwrap().success(), "archive stop");
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `partitions=[0, 1, 2]` in a log line.
fn partitions_in(line: &str) -> BTreeSet<i32> {
    let Some(from) = line.find("partitions=[") else {
        return BTreeSet::new();
    };
    let rest = &line[from + "partitions=[".len()..];
    let list = &rest[..rest.find(']').unwrap_or(0)];
    list.split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// Until `cond` holds (polled every 50 ms); how long it took.
fn until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WITHIN, "{what}: not within {WITHIN:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// Event ids in every line of every file under `dir/logs`, counted.
fn lines(dir: &Path) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    let mut stack = vec![dir.join("logs")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: {line:?}: {e}", p.display()));
                let id = v["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: no id in {line}", p.display()));
                *ids.entry(id.to_string()).or_insert(0) += 1;
            }
        }
    }
    ids
}

/// The partition sluice puts an event of the load on (keyed by tenant).
fn partition_of(id: &str) -> i32 {
    // c{client}-{request}-{index}; tenant t{(request + index) % 8}.
    let mut it = id.split('-').skip(1).map(|x| x.parse::<usize>().unwrap());
    let (n, i) = (it.next().unwrap(), it.next().unwrap());
    let tenant = format!("t{}", (n + i) % 8);
    partition_for(Some(tenant.as_bytes()), 0, PARTITIONS as i32)
}

#[test]
fn two_archivers_hand_partitions_over_on_kill_and_take_them_back_at_once() {
    let Some(cluster) = shared() else {
        return;
    };
    let t_case = Instant::now();
    cluster.create_topic(TOPIC, PARTITIONS, &[("min.insync.replicas", "2")]);
    cluster.create_topic("arch-dlq", 1, &[("min.insync.replicas", "2")]);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("archive.toml");
    std::fs::write(
        &config,
        format!(
            "[archive]\ncommit-interval-ms = 200\ncommit-records = {COMMIT_RECORDS}\n\
             [archive.librdkafka]\n\"session.timeout.ms\" = \"{SESSION_MS}\"\n\
             \"heartbeat.interval.ms\" = \"1000\"\n"
        ),
    )
    .unwrap();
    let daemon = serve_to(cluster.bootstrap(), TOPIC, &tmp.path().join("data")).start();
    let load = light_load(&daemon.addr, 0);
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut a = Archiver::start(&da, 1, cluster.bootstrap(), &config);
    let mut b = Archiver::start(&db, 1, cluster.bootstrap(), &config);
    let split = until("both archivers hold partitions", || {
        let (ha, hb) = (a.holds(), b.holds());
        !ha.is_empty() && !hb.is_empty() && ha.len() + hb.len() == PARTITIONS as usize
    });
    eprintln!(
        "archive: split {:?} / {:?} {:.1} s after start",
        a.holds(),
        b.holds(),
        split.as_secs_f64()
    );
    load.wait_more(2_000);

    // 1. kill -9 A and leave it down: the coordinator expires it after
    // session.timeout.ms and B takes every partition.
    let a_held = a.holds();
    a.kill_9();
    let takeover = until("B takes every partition", || {
        b.holds().len() == PARTITIONS as usize
    });
    load.wait_more(1_000);
    // 2. restart A: a new join of the same static member id, a rebalance,
    // and A holds partitions again.
    let mut a = Archiver::start(&da, 2, cluster.bootstrap(), &config);
    let takeback = until("A holds partitions again", || !a.holds().is_empty());
    until("the group settles on both", || {
        a.holds().len() + b.holds().len() == PARTITIONS as usize && !b.holds().is_empty()
    });
    load.wait_more(1_000);
    // 3. kill -9 A and restart it at once, within the session timeout: the
    // static member replaces its previous incarnation, B is not revoked.
    // (B has led the group since A expired, and a static member that is
    // not the leader gets its cached assignment back; before KIP-814,
    // JoinGroup v9, which librdkafka 2.12 does not send, a rejoining
    // static *leader* makes the coordinator rebalance.)
    let a_held2 = a.holds();
    let b_revoked = b.revocations();
    let t_kill = Instant::now();
    a.kill_9();
    let mut a = Archiver::start(&da, 3, cluster.bootstrap(), &config);
    let fast = until("A holds its partitions again", || !a.holds().is_empty());
    let fast_total = t_kill.elapsed();
    let back = a.holds();
    let same = back == a_held2;
    let b_revoked_meanwhile = b.revocations() - b_revoked;
    load.wait_more(1_000);

    let (acked, refused) = load.finish();
    wait_delivered(&daemon.addr, WITHIN);
    let expected: std::collections::HashSet<&str> = acked.iter().map(String::as_str).collect();
    until("the archives hold every acknowledged event", || {
        let mut all = lines(&da);
        for (k, v) in lines(&db) {
            *all.entry(k).or_insert(0) += v;
        }
        expected.iter().all(|id| all.contains_key(*id))
    });
    assert_eq!((a.ready(), b.ready()), (200, 200), "/ready of A and B");
    a.stop();
    b.stop();
    let (la, lb) = (lines(&da), lines(&db));
    let mut all: HashMap<&str, usize> = HashMap::new();
    for (k, v) in la.iter().chain(lb.iter()) {
        *all.entry(k).or_insert(0) += v;
    }
    let lost = acked
        .iter()
        .filter(|id| !all.contains_key(id.as_str()))
        .count();
    let unknown = all.keys().filter(|k| !expected.contains(*k)).count();
    let dups: Vec<(&str, usize)> = all
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(k, &n)| (*k, n))
        .collect();
    let in_both = la.keys().filter(|k| lb.contains_key(*k)).count();
    let dup_partitions: BTreeSet<i32> = dups.iter().map(|(id, _)| partition_of(id)).collect();
    eprintln!(
        "archive: session.timeout.ms {SESSION_MS}: after kill -9 of A ({a_held:?}), B held all \
         {PARTITIONS} in {:.1} s; A restarted took partitions back in {:.1} s; kill -9 and \
         restart at once: A held {:?} again {:.1} s after the restart ({:.1} s after the kill), \
         same partitions {same}, B revoked {b_revoked_meanwhile} times meanwhile; \
         {} acknowledged, lines {} + {}, lost {lost}, unknown {unknown}, ids on more than one \
         line {} (in both directories {in_both}, partitions {dup_partitions:?}); non-202 \
         {refused:?}; case {:.1} s",
        takeover.as_secs_f64(),
        takeback.as_secs_f64(),
        a_held2,
        fast.as_secs_f64(),
        fast_total.as_secs_f64(),
        acked.len(),
        la.values().sum::<usize>(),
        lb.values().sum::<usize>(),
        dups.len(),
        t_case.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0, "acknowledged events in no archive");
    assert_eq!(unknown, 0, "lines of events never acknowledged");
    // The documented window: one commit (at most commit-records records)
    // per kill, on the killed archiver's partitions.
    assert!(
        dups.len() <= 2 * COMMIT_RECORDS,
        "{} ids on more than one line, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(5)]
    );
    assert!(
        dup_partitions.is_subset(&a_held.union(&a_held2).copied().collect()),
        "duplicates on partitions {dup_partitions:?}, A held {a_held:?} and {a_held2:?}"
    );
    // The coordinator expired the killed member after the session
    // timeout, not before; a static member restarted at once got its
    // partitions back without a rebalance of the others.
    assert!(
        takeover >= Duration::from_millis(SESSION_MS / 2),
        "{takeover:?}"
    );
    assert!(same, "A came back with {back:?}, held {a_held2:?}");
    assert_eq!(b_revoked_meanwhile, 0, "B was revoked by a static restart");
    assert!(refused.is_empty(), "non-202 answers: {refused:?}");
}
