//! What the fault cases share: clients loading a `sluice serve` (that may be
//! restarted on another port), a complete read of a topic, and the verdict
//! of the consumer rule (`examples/dedupe_consumer.py`: per (instance,
//! partition), keep a record only if its `seq` is above every `seq` kept
//! before, in partition order).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use sluice::dev::consume::Consumed;

use crate::http;

/// A loaded 2-core machine running four JVMs: generous, never a pass/fail
/// timing by itself.
pub const WITHIN: Duration = Duration::from_secs(240);

/// How the clients send.
#[derive(Clone, Copy)]
pub struct LoadSpec {
    pub clients: usize,
    /// Events per request.
    pub batch: usize,
    /// Clients 0..hot send every event with tenant "hot"; the others spread
    /// over 8 tenants.
    pub hot: usize,
    /// Every other request goes to this route (a stream whose events carry
    /// no key), when set.
    pub unkeyed_route: Option<&'static str>,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            clients: 3,
            batch: 20,
            hot: 2,
            unkeyed_route: None,
        }
    }
}

/// Clients POSTing batches until told to stop; every id that got a 202
/// goes into `acked`, every other answer is counted by status (0: no
/// connection, e.g. while the daemon restarts).
pub struct Load {
    addr: Arc<RwLock<String>>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<BTreeMap<u16, usize>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: &str, spec: LoadSpec) -> Load {
        let addr = Arc::new(RwLock::new(addr.to_string()));
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..spec.clients)
            .map(|c| {
                let (addr, stop, acked, refused) =
                    (addr.clone(), stop.clone(), acked.clone(), refused.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let ids: Vec<String> =
                            (0..spec.batch).map(|i| format!("c{c}-{n}-{i}")).collect();
                        let path = match spec.unkeyed_route {
                            Some(route) if n % 2 == 1 => route,
                            _ => "/v1/events",
                        };
                        let events: Vec<_> = ids
                            .iter()
                            .enumerate()
                            .map(|(i, id)| {
                                let tenant = if c < spec.hot {
                                    "hot".to_string()
                                } else {
                                    format!("t{}", (n + i) % 8)
                                };
                                serde_json::json!({"id": id, "tenant_id": tenant,
                                    "source": "apache-kafka", "message": format!("event {id}")})
                            })
                            .collect();
                        let to = addr.read().unwrap().clone();
                        let (status, _) =
                            http(&to, "POST", path, &serde_json::to_vec(&events).unwrap());
                        if status == 202 {
                            acked.lock().unwrap().extend(ids);
                            // A steady load, not all the CPU the JVMs need.
                            std::thread::sleep(Duration::from_millis(10));
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
            addr,
            stop,
            acked,
            refused,
            threads,
        }
    }

    /// Where the clients send from now on (a restarted daemon).
    pub fn set_addr(&self, addr: &str) {
        *self.addr.write().unwrap() = addr.to_string();
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Non-202 answers so far, by status.
    pub fn refused(&self) -> BTreeMap<u16, usize> {
        self.refused.lock().unwrap().clone()
    }

    /// Until `more` further events were acknowledged.
    pub fn wait_more(&self, more: usize) {
        let target = self.acked() + more;
        let t0 = Instant::now();
        while self.acked() < target {
            assert!(
                t0.elapsed() < WITHIN,
                "{} of {target} acknowledged, refused {:?}",
                self.acked(),
                self.refused()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(self) -> (Vec<String>, BTreeMap<u16, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let refused = std::mem::take(&mut *self.refused.lock().unwrap());
        (acked, refused)
    }
}

/// Every record of `topic` (every partition, offset 0 to the high
/// watermark, checked), in partition and offset order, read with the
/// project's reader (librdkafka).
pub fn read_topic(bootstrap: &str, topic: &str) -> Vec<Consumed> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    let mut total = 0;
    for p in md.topics()[0].partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(30))
            .unwrap();
        assert_eq!(low, 0, "{topic} [{}] starts at {low}", p.id());
        total += high as usize;
    }
    let mut out = Vec::with_capacity(total);
    sluice::dev::consume::consume(
        bootstrap,
        topic,
        true,
        Some(total),
        Duration::from_secs(60),
        |r| out.push(r),
    )
    .unwrap();
    assert_eq!(
        out.len(),
        total,
        "{topic}: read {} of {total} records",
        out.len()
    );
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

/// The consumer rule applied to a topic read whole.
#[derive(Debug, Default)]
pub struct Verdict {
    pub records: usize,
    pub acked: usize,
    /// Acknowledged ids the rule does not keep (lost, or dropped as repeats).
    pub lost: Vec<String>,
    /// Records whose id came before (at-least-once repeats, raw topic).
    pub raw_duplicates: usize,
    pub dropped_by_rule: usize,
    /// Ids the rule keeps more than once.
    pub duplicates_after_rule: usize,
    /// Ids kept but never acknowledged (a 202 cut by a kill: allowed).
    pub unacknowledged: usize,
    /// First occurrences of a `seq` at or below an earlier one of the same
    /// (instance, partition).
    pub order_violations: Vec<String>,
    /// (instance, seq) found on more than one partition.
    pub split: Vec<String>,
    /// Records per partition.
    pub per_partition: BTreeMap<i32, usize>,
}

impl Verdict {
    /// Nothing lost, nothing twice after the rule, first occurrences in
    /// order, every (instance, seq) on one partition.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.lost.is_empty(),
            "{what}: {} acknowledged events not kept, e.g. {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)]
        );
        assert_eq!(
            self.duplicates_after_rule, 0,
            "{what}: duplicates after the rule"
        );
        assert!(
            self.order_violations.is_empty(),
            "{what}: first occurrences out of seq order: {:?}",
            &self.order_violations[..self.order_violations.len().min(5)]
        );
        assert!(
            self.split.is_empty(),
            "{what}: (instance, seq) on two partitions: {:?}",
            &self.split[..self.split.len().min(5)]
        );
    }

    pub fn line(&self) -> String {
        format!(
            "acknowledged {}, records {}, lost {}, raw duplicates {}, dropped by the rule {}, \
             duplicates after the rule {}, kept unacknowledged {}, order violations {}, \
             seqs on two partitions {}, per partition {:?}",
            self.acked,
            self.records,
            self.lost.len(),
            self.raw_duplicates,
            self.dropped_by_rule,
            self.duplicates_after_rule,
            self.unacknowledged,
            self.order_violations.len(),
            self.split.len(),
            self.per_partition
        )
    }
}

pub fn verdict(acked: &[String], records: &[Consumed]) -> Verdict {
    let mut v = Verdict {
        records: records.len(),
        acked: acked.len(),
        ..Verdict::default()
    };
    let mut high: HashMap<(&str, i32), u64> = HashMap::new();
    let mut first_high: HashMap<(&str, i32), u64> = HashMap::new();
    let mut partition_of: HashMap<(&str, u64), i32> = HashMap::new();
    let mut seen_ids: HashSet<&str> = HashSet::new();
    let mut kept: HashMap<&str, u64> = HashMap::new();
    for r in records {
        *v.per_partition.entry(r.partition).or_default() += 1;
        let id = r.header("id").expect("id header");
        let instance = r.header("instance").expect("instance header");
        let seq: u64 = r.header("seq").expect("seq header").parse().unwrap();
        if !seen_ids.insert(id) {
            v.raw_duplicates += 1;
        }
        match partition_of.get(&(instance, seq)) {
            None => {
                partition_of.insert((instance, seq), r.partition);
                let h = first_high.entry((instance, r.partition)).or_insert(0);
                if seq <= *h {
                    v.order_violations.push(format!(
                        "partition {} offset {}: seq {seq} after {}",
                        r.partition, r.offset, *h
                    ));
                } else {
                    *h = seq;
                }
            }
            Some(&p) if p != r.partition => {
                v.split
                    .push(format!("{instance} seq {seq} on {p} and {}", r.partition));
            }
            Some(_) => {}
        }
        let h = high.entry((instance, r.partition)).or_insert(0);
        if seq > *h {
            *h = seq;
            *kept.entry(id).or_insert(0) += 1;
        } else {
            v.dropped_by_rule += 1;
        }
    }
    let acked_set: HashSet<&str> = acked.iter().map(String::as_str).collect();
    v.lost = acked
        .iter()
        .filter(|id| !kept.contains_key(id.as_str()))
        .cloned()
        .collect();
    v.duplicates_after_rule = kept.values().filter(|&&n| n > 1).count();
    v.unacknowledged = kept.keys().filter(|id| !acked_set.contains(*id)).count();
    v
}

/// `sluice serve` on `data` producing to `topic` and its dead-letter topic
/// `{topic}-dlq` on the cluster at `bootstrap`.
pub fn serve_to(bootstrap: &str, topic: &str, data: &std::path::Path) -> crate::support::Serve {
    crate::support::Serve::new(data).brokers(bootstrap).envs(&[
        ("SLUICE_KAFKA_TOPIC", topic),
        ("SLUICE_KAFKA_DEAD_LETTER_TOPIC", &format!("{topic}-dlq")),
    ])
}

/// Two clients of 10-event batches on `daemon`, keyed by tenant: `hot`
/// of them on tenant "hot", the others spread over 8 tenants.
pub fn light_load(addr: &str, hot: usize) -> Load {
    Load::start(
        addr,
        LoadSpec {
            clients: 2,
            batch: 10,
            hot,
            unkeyed_route: None,
        },
    )
}

/// One sample of `/metrics` (`name` with its labels as printed, e.g.
/// `sluice_replay_stalled{cause="no_leader"}`).
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    let (status, body) = http(addr, "GET", "/metrics", b"");
    assert_eq!(status, 200, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The daemon's log so far.
pub fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
