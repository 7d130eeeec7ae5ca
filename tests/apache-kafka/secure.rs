//! What the cases on the shared SASL cluster (`Cluster::shared_sasl`) have
//! in common: topics a SASL user may write, a sluice that reaches the
//! brokers as that user over SASL_SSL, a load of keyed batches whose
//! acknowledged events are remembered with their `seq`, and the checks every
//! case makes on what landed (read back over the PLAINTEXT listener, as the
//! super user, with the project's reader).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice::dev::consume::Consumed;

use crate::http;
use crate::support::apache_kafka::{Cluster, Resource};
use crate::support::{Daemon, Serve};

/// A loaded 2-core machine running three JVMs: generous, never a pass/fail
/// timing by itself.
pub const WITHIN: Duration = Duration::from_secs(240);

/// The SCRAM user every cluster from `start_sasl` has.
pub const USER: &str = "sluice";

/// Creates `topic` (`partitions`, the cluster's replication factor 3 and
/// min.insync.replicas 2, `configs` on top) and `topic-dlq` (1 partition),
/// and lets `user` write both.
pub fn topics(
    cluster: &Cluster,
    topic: &str,
    partitions: u32,
    configs: &[(&str, &str)],
    user: &str,
) {
    let dlq = format!("{topic}-dlq");
    // A JVM per command: both topics at once.
    std::thread::scope(|s| {
        s.spawn(|| cluster.create_topic(topic, partitions, configs));
        cluster.create_topic(&dlq, 1, &[]);
    });
    let principal = format!("User:{user}");
    cluster.acl_add(&principal, &["Write"], Resource::Topics(&[topic, &dlq]));
}

/// A sluice daemon and the directory of its config file.
pub struct Sluice {
    pub daemon: Daemon,
    _dir: tempfile::TempDir,
}

/// `sluice serve --config FILE` where FILE is `toml` (a `[kafka]` section
/// with the SASL settings), writing `topic` and `topic-dlq`, with `env` on
/// top (`SLUICE_...`).
pub fn serve_with_config(toml: &str, topic: &str, env: &[(&str, &str)]) -> Sluice {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, toml).unwrap();
    let dlq = format!("{topic}-dlq");
    let daemon = Serve::temp()
        .arg("--config")
        .arg(&config)
        .envs(&[
            ("SLUICE_TOPIC", topic),
            ("SLUICE_KAFKA_DEAD_LETTER_TOPIC", &dlq),
        ])
        .envs(env)
        .start();
    Sluice { daemon, _dir: dir }
}

/// sluice as SASL user `user`: the brokers' SASL_SSL listeners and the
/// properties `cluster.py client-config` gives (SCRAM-SHA-512, the CA).
pub fn serve_as(cluster: &Cluster, user: &str, topic: &str, env: &[(&str, &str)]) -> Sluice {
    let mut toml = format!(
        "[kafka]\nbrokers = \"{}\"\n[kafka.librdkafka]\n",
        cluster.sasl_bootstrap()
    );
    for (k, v) in cluster.client_config(user) {
        toml.push_str(&format!("\"{k}\" = \"{v}\"\n"));
    }
    serve_with_config(&toml, topic, env)
}

/// An event a client got a 202 for, with the `seq` the answer gave it.
#[derive(Debug, Clone)]
pub struct Acked {
    pub id: String,
    pub seq: u64,
}

/// POSTs `events` as one batch; the acknowledged ones (all of them, or
/// none when the answer is not 202). Panics when sluice refuses one event
/// of a 202'd batch: the cases send only valid events.
pub fn post(addr: &str, events: &[serde_json::Value]) -> (u16, Vec<Acked>) {
    let (status, body) = http(
        addr,
        "POST",
        "/v1/events",
        &serde_json::to_vec(events).unwrap(),
    );
    if status != 202 {
        return (status, Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["accepted"], events.len(), "{body}");
    let first = v["first_seq"].as_u64().unwrap();
    assert_eq!(
        v["last_seq"].as_u64().unwrap(),
        first + events.len() as u64 - 1,
        "{body}"
    );
    let acked = events
        .iter()
        .enumerate()
        .map(|(i, e)| Acked {
            id: e["id"].as_str().unwrap().to_string(),
            seq: first + i as u64,
        })
        .collect();
    (status, acked)
}

/// A small event with id `id` and key `key`.
pub fn event(id: &str, key: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "tenant_id": key, "source": "apache-kafka",
        "message": format!("event {id}")})
}

/// Clients POSTing batches of 20 events over `keys` keys, each pausing
/// `pause` after a 202, until told to stop; every acknowledged event goes
/// into `acked`. A pause keeps a case that waits on the broker from
/// filling the WAL (and the read-back) with millions of events.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    refused: Arc<Mutex<BTreeMap<u16, usize>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: &str, prefix: &str, clients: usize, keys: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..clients)
            .map(|c| {
                let (addr, prefix, stop, acked, refused) = (
                    addr.to_string(),
                    prefix.to_string(),
                    stop.clone(),
                    acked.clone(),
                    refused.clone(),
                );
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let events: Vec<_> = (0..20)
                            .map(|i| {
                                event(
                                    &format!("{prefix}-{c}-{n}-{i}"),
                                    &format!("k{}", (c * 7 + n + i) % keys),
                                )
                            })
                            .collect();
                        let (status, got) = post(&addr, &events);
                        if status == 202 {
                            acked.lock().unwrap().extend(got);
                            std::thread::sleep(pause);
                        } else {
                            *refused.lock().unwrap().entry(status).or_insert(0) += 1;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            acked,
            refused,
            threads,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Until `more` further events were acknowledged.
    pub fn wait_more(&self, more: usize) {
        let target = self.acked() + more;
        let t0 = Instant::now();
        while self.acked() < target {
            assert!(
                t0.elapsed() < WITHIN,
                "{} of {target} acknowledged",
                self.acked()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(self) -> (Vec<Acked>, BTreeMap<u16, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let refused = std::mem::take(&mut *self.refused.lock().unwrap());
        (acked, refused)
    }
}

/// Every record of `topic`, read over the PLAINTEXT listeners (as the
/// super user) by the project's reader, in (partition, offset) order.
pub fn read(cluster: &Cluster, topic: &str) -> Vec<Consumed> {
    read_up_to(cluster, topic, None)
}

/// As [`read`], stopping at `max` records (or 5 s without one): for a
/// topic whose count is known, such as the dead-letter topic.
pub fn read_n(cluster: &Cluster, topic: &str, max: usize) -> Vec<Consumed> {
    read_up_to(cluster, topic, Some(max))
}

fn read_up_to(cluster: &Cluster, topic: &str, max: Option<usize>) -> Vec<Consumed> {
    let mut records = Vec::new();
    sluice::dev::consume::consume(
        cluster.bootstrap(),
        topic,
        true,
        max,
        Duration::from_secs(5),
        |c| records.push(c),
    )
    .unwrap();
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// What a topic holds, judged as the README's consumer rule would.
#[derive(Debug, Default)]
pub struct Verdict {
    /// How often each event id appears (at-least-once: repeats are allowed).
    pub ids: HashMap<String, usize>,
    /// First occurrences of a seq at or below an earlier one of the same
    /// (instance, partition): (partition, offset, seq, after).
    pub out_of_order: Vec<(i32, i64, u64, u64)>,
    /// Per (instance, key), first occurrences whose seq is not above the
    /// key's last: (key, seq, after).
    pub key_out_of_order: Vec<(String, u64, u64)>,
    /// Records the rule keeps more than once per id: must be 0.
    pub repeats_after_rule: usize,
    /// Records the rule drops (repeats of an earlier seq).
    pub dropped_by_rule: usize,
}

pub fn judge(records: &[Consumed]) -> Verdict {
    let mut v = Verdict::default();
    let mut high: HashMap<(String, i32), u64> = HashMap::new();
    let mut key_high: HashMap<(String, String), u64> = HashMap::new();
    let mut first_seen: HashSet<(String, u64)> = HashSet::new();
    let mut kept: HashMap<String, usize> = HashMap::new();
    for r in records {
        let id = r.header("id").unwrap().to_string();
        *v.ids.entry(id.clone()).or_insert(0) += 1;
        let seq: u64 = r.header("seq").unwrap().parse().unwrap();
        let instance = r.header("instance").unwrap().to_string();
        let h = high.entry((instance.clone(), r.partition)).or_insert(0);
        if first_seen.insert((instance.clone(), seq)) {
            if seq <= *h {
                v.out_of_order.push((r.partition, r.offset, seq, *h));
            }
            let key = r.key.clone().unwrap_or_default();
            let kh = key_high.entry((instance, key.clone())).or_insert(0);
            if seq <= *kh {
                v.key_out_of_order.push((key, seq, *kh));
            }
            *kh = seq.max(*kh);
        }
        // The consumer rule: keep a record only above the highest seq kept
        // for its (instance, partition).
        if seq > *h {
            *h = seq;
            let n = kept.entry(id).or_insert(0);
            *n += 1;
            if *n > 1 {
                v.repeats_after_rule += 1;
            }
        } else {
            v.dropped_by_rule += 1;
        }
    }
    v
}

impl Verdict {
    /// Asserts first occurrences rise per (instance, partition) and per
    /// (instance, key), and the rule leaves each id once.
    pub fn assert_ordered(&self, what: &str) {
        assert!(
            self.out_of_order.is_empty(),
            "{what}: first occurrences out of seq order (partition, offset, seq, after): {:?}",
            &self.out_of_order[..self.out_of_order.len().min(5)]
        );
        assert!(
            self.key_out_of_order.is_empty(),
            "{what}: per key, first occurrences out of seq order (key, seq, after): {:?}",
            &self.key_out_of_order[..self.key_out_of_order.len().min(5)]
        );
        assert_eq!(
            self.repeats_after_rule, 0,
            "{what}: ids kept twice by the consumer rule"
        );
    }

    /// The acknowledged events of `acked` that are not in the topic.
    pub fn missing<'a>(&self, acked: impl IntoIterator<Item = &'a Acked>) -> Vec<&'a Acked> {
        acked
            .into_iter()
            .filter(|a| !self.ids.contains_key(&a.id))
            .collect()
    }
}

/// The value of one sample in sluice's `/metrics`, e.g.
/// `sluice_replay_failures_total{kind="authorization"}`; 0 when absent.
pub fn metric(addr: &str, sample: &str) -> f64 {
    let (status, text) = http(addr, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Prints where a case is, with its time since `t0`: the cases' phases
/// in the test's output.
pub fn phase(t0: Instant, case: &str, what: &str) {
    eprintln!("[{:6.1} s] {case}: {what}", t0.elapsed().as_secs_f64());
}

/// Polls `/stats` until `ok` holds; panics with the last answer after
/// [`WITHIN`].
pub fn wait_stats(
    addr: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let s = crate::stats(addr);
        if ok(&s) {
            return s;
        }
        assert!(t0.elapsed() < WITHIN, "{what}: not within {WITHIN:?}: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
