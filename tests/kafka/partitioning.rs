//! A record's partition is a function of the record and of a partition count
//! pinned in sluice's own state, the same on every attempt: the consumer rule
//! deduplicates per (instance, partition), so a copy produced again on
//! another partition passes it (a duplicate), and a retried record landing
//! behind a later one on another partition is dropped (a loss).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice::dev::consume::Consumed;
use sluice::replay::partition::{murmur2, partition_for};
use sluice::wal::Record;

use super::{event, read_topic, Node, TOPIC};

fn seq_of(c: &Consumed) -> u64 {
    c.header("seq").expect("seq header").parse().unwrap()
}

/// seq -> every partition it was written to, over all the given reads.
fn partitions_by_seq<'a>(
    reads: impl IntoIterator<Item = &'a Consumed>,
) -> BTreeMap<u64, BTreeSet<i32>> {
    let mut m: BTreeMap<u64, BTreeSet<i32>> = BTreeMap::new();
    for c in reads {
        m.entry(seq_of(c)).or_default().insert(c.partition);
    }
    m
}

fn assert_one_partition_each(by_seq: &BTreeMap<u64, BTreeSet<i32>>, last: u64) {
    let moved: Vec<_> = by_seq.iter().filter(|(_, ps)| ps.len() > 1).collect();
    assert!(
        moved.is_empty(),
        "{} records written to more than one partition, e.g. {:?}",
        moved.len(),
        &moved[..moved.len().min(8)]
    );
    let missing: Vec<u64> = (1..=last).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
}

/// A record without a key (`None`) or with an empty one, as a stream whose
/// `key-field` is absent from the event produces it.
fn unkeyed(n: usize) -> Record {
    let mut r = event("u", "t", n, 0);
    r.key = if n % 2 == 0 { None } else { Some(Vec::new()) };
    r
}

/// Where librdkafka's `partitioner` puts each key: one record per key
/// produced to the topic `reference`, read back.
async fn reference_partitions(
    brokers: &str,
    partitioner: &str,
    keys: &[String],
) -> BTreeMap<String, i32> {
    let reference: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", partitioner)
        .create()
        .unwrap();
    for k in keys {
        reference
            .send(
                FutureRecord::<_, [u8]>::to("reference").key(k.as_str()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    read_topic(brokers, "reference")
        .await
        .iter()
        .map(|c| (c.key.clone().unwrap(), c.partition))
        .collect()
}

fn append(node: &Node, records: Vec<Record>) -> u64 {
    let payloads = records.iter().map(Record::encode).collect();
    tokio::task::block_in_place(|| node.wal.append_blocking(payloads))
        .unwrap()
        .last
}

/// Dies without the final commit, with delivered records above the offset.
async fn kill(running: super::Running) {
    running.task.abort();
    let _ = running.task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_records_keep_their_partition_across_kills() {
    let kafka = super::cluster(4);
    let brokers = kafka.bootstrap_servers();
    // Answers arrive 150 ms after the broker wrote the records: every kill
    // leaves written, unconfirmed records, which the next round produces
    // again.
    kafka
        .broker_round_trip_time(1, Duration::from_millis(150))
        .unwrap();
    let node = Node::temp();
    let mut last = 0;
    // Eight rounds: a round whose kill lands after every record was
    // confirmed makes no repeat, and the test needs some.
    for round in 0..8 {
        let running = node.start(&brokers, |_, _| {});
        let first = last + 1;
        for i in 0..5 {
            last = append(
                &node,
                (0..40)
                    .map(|n| unkeyed(round * 1000 + i * 40 + n))
                    .collect(),
            );
        }
        // Killed as soon as the round's first records are confirmed: the
        // rest are written or in flight, unconfirmed.
        let t0 = std::time::Instant::now();
        while node.stats.delivered_through.load(Ordering::Relaxed) < first {
            assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", node.stats);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kill(running).await;
    }
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    let got = read_topic(&brokers, TOPIC).await;
    assert!(
        got.len() as u64 > last,
        "the kills made replay produce records again ({} read, {last} records)",
        got.len()
    );
    let by_seq = partitions_by_seq(&got);
    assert_one_partition_each(&by_seq, last);
    for (seq, ps) in &by_seq {
        assert_eq!(
            ps.iter().next().copied(),
            Some((seq % 4) as i32),
            "seq {seq} spread by seq"
        );
    }
}

/// Keys land where Kafka's own clients put them: librdkafka's `murmur2`
/// partitioner (the Java client's default) on another topic of the same
/// cluster is the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_on_kafkas_murmur2_partition() {
    let kafka = super::cluster(7);
    kafka.create_topic("reference", 7, 1).unwrap();
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let running = node.start(&brokers, |_, _| {});
    let tenants: Vec<String> = (0..60).map(|i| format!("tenant-{i}")).collect();
    let refs: Vec<&str> = tenants.iter().map(String::as_str).collect();
    let last = node.append("k", &refs, 300);
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;

    let want = reference_partitions(&brokers, "murmur2", &tenants).await;
    assert_eq!(want.len(), tenants.len());
    let mut spread = BTreeSet::new();
    for c in read_topic(&brokers, TOPIC).await {
        let key = c.key.clone().unwrap();
        assert_eq!(Some(&c.partition), want.get(&key), "key {key}");
        assert_eq!(
            c.partition,
            (murmur2(key.as_bytes()) & 0x7fff_ffff) as i32 % 7
        );
        spread.insert(c.partition);
    }
    assert!(spread.len() > 3, "keys spread over partitions: {spread:?}");
}

/// The topic grows from 3 to 6 partitions while the daemon is down with
/// delivered records above its offset. librdkafka's mock cannot add
/// partitions, so the grown topic is a second cluster whose topic has 6
/// (the failover the README describes has the same shape); the records the
/// restart produces again must land where their first copies did, and only
/// records above everything produced before take the new count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_count_raised_between_a_kill_and_the_restart_moves_no_record() {
    let before = super::cluster(3);
    // Answers come 3 s after the writes: the kill finds every record
    // written and none confirmed, however slow the machine is.
    before
        .broker_round_trip_time(1, Duration::from_millis(3000))
        .unwrap();
    let after = super::cluster(6);
    let node = Node::temp();
    let running = node.start(&before.bootstrap_servers(), |_, r| {
        r.commit_interval_ms = 60_000
    });
    // In chunks, so that several produce requests are in flight at once.
    let mut killed_at = 0;
    for chunk in 0..6 {
        let mut records: Vec<Record> = (chunk * 25..chunk * 25 + 25).map(unkeyed).collect();
        records.extend(
            (chunk * 25..chunk * 25 + 25).map(|n| event("k", &format!("t{}", n % 17), n, 0)),
        );
        killed_at = append(&node, records);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Killed once every record was handed to librdkafka and sent: written
    // by the broker, not confirmed; the restart produces them again.
    let t0 = std::time::Instant::now();
    while node.stats.produced.load(Ordering::Relaxed) < killed_at {
        assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", node.stats);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill(running).await;
    assert!(node.offsets.committed().unwrap() < killed_at);
    before
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();

    let running = node.start(&after.bootstrap_servers(), |_, _| {});
    node.wait_committed(killed_at, Duration::from_secs(60))
        .await;
    let mut more: Vec<Record> = (1000..1100).map(unkeyed).collect();
    more.extend((0..100).map(|n| event("m", &format!("t{}", n % 17), n, 0)));
    let last = append(&node, more);
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    assert_eq!(node.stats.partition_changes.load(Ordering::Relaxed), 1);

    let first = read_topic(&before.bootstrap_servers(), TOPIC).await;
    let second = read_topic(&after.bootstrap_servers(), TOPIC).await;
    let replayed: BTreeSet<u64> = second
        .iter()
        .map(seq_of)
        .filter(|s| *s <= killed_at)
        .collect();
    assert!(
        !replayed.is_empty(),
        "the restart produced records of the first run again"
    );
    let by_seq = partitions_by_seq(first.iter().chain(second.iter()));
    assert_one_partition_each(&by_seq, last);
    for c in &second {
        let seq = seq_of(c);
        let n = if seq <= killed_at { 3 } else { 6 };
        assert_eq!(
            c.partition,
            partition_for(c.key.as_deref().map(str::as_bytes), seq, n),
            "seq {seq} over {n} partitions"
        );
    }
    let above: BTreeSet<i32> = second
        .iter()
        .filter(|c| seq_of(c) > killed_at)
        .map(|c| c.partition)
        .collect();
    assert!(
        above.iter().any(|p| *p >= 3),
        "new records use all 6: {above:?}"
    );
}

/// A data dir written by a build that let librdkafka partition (no pinning
/// start recorded) keeps librdkafka's CRC-32 choice for what that build may
/// have produced, so an upgrade moves no keyed record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_build_before_pinning_keep_librdkafkas_partitions() {
    let kafka = super::cluster(5);
    kafka.create_topic("reference", 5, 1).unwrap();
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let tenants: Vec<String> = (0..40).map(|i| format!("tenant-{i}")).collect();
    let refs: Vec<&str> = tenants.iter().map(String::as_str).collect();
    // Appended before anything recorded where pinning started: the old
    // build's records.
    let old = node.append("old", &refs, 120);
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(old, Duration::from_secs(60)).await;
    let last = node.append("new", &refs, 120);
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    assert_eq!(node.offsets.pinning_since().unwrap(), Some(old + 1));

    // librdkafka's default partitioner for keyed records.
    let legacy = reference_partitions(&brokers, "consistent_random", &tenants).await;
    let mut differ = 0;
    for c in read_topic(&brokers, TOPIC).await {
        let key = c.key.clone().unwrap();
        let seq = seq_of(&c);
        if seq <= old {
            assert_eq!(Some(&c.partition), legacy.get(&key), "old seq {seq}");
        } else {
            assert_eq!(
                c.partition,
                partition_for(Some(key.as_bytes()), seq, 5),
                "new seq {seq}"
            );
            differ += usize::from(legacy.get(&key) != Some(&c.partition));
        }
    }
    assert!(
        differ > 0,
        "the two schemes differ for some keys, or this proves nothing"
    );
}
