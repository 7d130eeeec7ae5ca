//! The leader of the busiest partition killed with SIGKILL under load, then
//! restarted: 3 nodes, the topic at replication factor 3 with
//! min.insync.replicas 2, sluice producing with acks=all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice::replay::partition::partition_for;

use crate::support::apache_kafka::Cluster;
use crate::support::Serve;
use crate::{http, stats, wait_delivered};

const TOPIC: &str = "events";
const PARTITIONS: u32 = 3;
/// A loaded 2-core machine running three JVMs: generous, never a pass/fail
/// timing by itself.
const WITHIN: Duration = Duration::from_secs(240);

/// Clients POSTing batches of 20 events until told to stop; every id that
/// got a 202 goes into `acked`.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<BTreeMap<u16, usize>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..3)
            .map(|c| {
                let (addr, stop, acked, refused) = (
                    addr.to_string(),
                    stop.clone(),
                    acked.clone(),
                    refused.clone(),
                );
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let ids: Vec<String> = (0..20).map(|i| format!("c{c}-{n}-{i}")).collect();
                        // Clients 0 and 1 send one hot tenant; client 2 spreads.
                        let events: Vec<_> = ids
                            .iter()
                            .enumerate()
                            .map(|(i, id)| {
                                let tenant = if c < 2 {
                                    "hot".to_string()
                                } else {
                                    format!("t{}", (n + i) % 8)
                                };
                                serde_json::json!({"id": id, "tenant_id": tenant,
                                    "source": "failover", "message": format!("event {id}")})
                            })
                            .collect();
                        let (status, _) = http(
                            &addr,
                            "POST",
                            "/v1/events",
                            &serde_json::to_vec(&events).unwrap(),
                        );
                        if status == 202 {
                            acked.lock().unwrap().extend(ids);
                            // A steady load, not all the CPU three JVMs need.
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
            stop,
            acked,
            refused,
            threads,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Until `more` further events were acknowledged.
    fn wait_more(&self, more: usize) {
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

    fn finish(self) -> (Vec<String>, BTreeMap<u16, usize>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let refused = std::mem::take(&mut *self.refused.lock().unwrap());
        (acked, refused)
    }
}

#[test]
fn the_killed_leader_of_the_busiest_partition_loses_no_acknowledged_event() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    cluster.create_topic(TOPIC, PARTITIONS, &[("min.insync.replicas", "2")]);
    cluster.create_topic("events-dlq", 1, &[("min.insync.replicas", "2")]);
    let daemon = Serve::temp()
        .brokers(cluster.bootstrap())
        // Records the dead leader held in flight time out and are produced
        // again from the committed offset: the path under test, sooner.
        .envs(&[("SLUICE_KAFKA_MESSAGE_TIMEOUT_MS", "20000")])
        .start();

    let load = Load::start(&daemon.addr);
    load.wait_more(2_000);
    // The partition of the hot tenant (sluice's own partitioner), and its leader.
    let hot = partition_for(Some(b"hot"), 1, PARTITIONS as i32);
    let leader = cluster.leader(TOPIC, hot);
    assert!(leader > 0, "partition {hot} has no leader");
    let at_kill = stats(&daemon.addr)["replay"]["last_seq"].as_u64().unwrap();
    cluster.kill(leader as u32);
    eprintln!("killed node {leader}, leader of partition {hot}, at seq {at_kill}");

    // The controller fences the dead node (broker.session.timeout.ms) and
    // elects another leader from the ISR; replay goes on through it.
    let t0 = Instant::now();
    let new_leader = loop {
        let l = cluster.leader(TOPIC, hot);
        if l > 0 && l != leader {
            break l;
        }
        assert!(
            t0.elapsed() < WITHIN,
            "partition {hot} led by {l} after {leader} died"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let failover = t0.elapsed();
    let past = stats(&daemon.addr)["replay"]["last_seq"].as_u64().unwrap();
    loop {
        let s = stats(&daemon.addr);
        if s["replay"]["delivered_through"].as_u64().unwrap() >= past {
            break;
        }
        assert!(
            t0.elapsed() < WITHIN,
            "replay stuck with node {leader} down: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "node {new_leader} leads partition {hot} after {:.1} s; delivered through seq {past} \
         after {:.1} s, with node {leader} down",
        failover.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    cluster.restart(leader as u32);
    load.wait_more(2_000);
    let (acked, refused) = load.finish();
    let s = wait_delivered(&daemon.addr, WITHIN);

    // Read back with the project's reader (librdkafka), every partition.
    let mut records = Vec::new();
    sluice::dev::consume::consume(
        cluster.bootstrap(),
        TOPIC,
        true,
        None,
        Duration::from_secs(5),
        |c| records.push(c),
    )
    .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    // Per (instance, partition): first occurrences come in rising seq.
    let mut high: HashMap<(String, i32), u64> = HashMap::new();
    let mut first_seen: HashSet<(String, u64)> = HashSet::new();
    let mut out_of_order = Vec::new();
    records.sort_by_key(|r| (r.partition, r.offset));
    for r in &records {
        *seen.entry(r.header("id").unwrap().to_string()).or_insert(0) += 1;
        let seq: u64 = r.header("seq").unwrap().parse().unwrap();
        let key = (r.header("instance").unwrap().to_string(), r.partition);
        if first_seen.insert((key.0.clone(), seq)) {
            let h = high.entry(key).or_insert(0);
            if seq <= *h {
                out_of_order.push((r.partition, r.offset, seq, *h));
            }
            *h = seq;
        }
    }
    let missing: Vec<&String> = acked.iter().filter(|i| !seen.contains_key(*i)).collect();
    let twice = seen.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{} acknowledged, {} records read, {} ids more than once (at-least-once), \
         non-202 answers {refused:?}, replay {}",
        acked.len(),
        records.len(),
        twice,
        s["replay"]
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged events not in {TOPIC}, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        out_of_order.is_empty(),
        "first occurrences out of seq order (partition, offset, seq, after): {:?}",
        &out_of_order[..out_of_order.len().min(5)]
    );
}
