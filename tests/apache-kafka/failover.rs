//! The leader of the busiest partition killed with SIGKILL under load, then
//! restarted: 3 brokers (the shared cluster), the topic at replication
//! factor 3 with min.insync.replicas 2, sluice producing with acks=all.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sluice::replay::partition::partition_for;

use crate::common::{Load, LoadSpec, WITHIN};
use crate::support::apache_kafka::shared;
use crate::support::Serve;
use crate::{stats, wait_delivered};

const TOPIC: &str = "events";
const PARTITIONS: u32 = 3;

#[test]
fn the_killed_leader_of_the_busiest_partition_loses_no_acknowledged_event() {
    let Some(cluster) = shared() else {
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

    let load = Load::start(&daemon.addr, LoadSpec::default());
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
