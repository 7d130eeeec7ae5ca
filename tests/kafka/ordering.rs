//! The ordering guarantee on every replay path: for each partition, the
//! first occurrence of each record comes in strictly increasing `seq`, so a
//! consumer that drops every `seq` at or below the highest it has seen per
//! (instance, partition) loses nothing. Each test drives one path with the
//! mock cluster's error injection while records keep arriving, then reads
//! the raw topic back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sluice::dev::consume::Consumed;

use super::{cluster, read_topic, Node, TOPIC};

/// Checks the guarantee on the raw topic and that every seq in 1..=last is
/// there.
fn assert_first_occurrences_rise(records: &[Consumed], last: u64) {
    let mut per_partition: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    for r in records {
        let seq = r.header("seq").expect("seq header").parse().unwrap();
        per_partition.entry(r.partition).or_default().push(seq);
    }
    let mut seen = BTreeSet::new();
    for (partition, seqs) in &per_partition {
        let mut high = 0;
        for &s in seqs {
            if seen.insert(s) {
                assert!(
                    s > high,
                    "partition {partition}: first occurrence of {s} after {high}: {seqs:?}"
                );
                high = s;
            }
        }
    }
    let missing: Vec<u64> = (1..=last).filter(|s| !seen.contains(s)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
}

/// Appends one record every `every` until `stop` resolves; returns the last seq.
async fn append_until(
    node: &Node,
    prefix: &str,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> u64 {
    tokio::pin!(stop);
    let mut n = 0;
    let mut last = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return last,
            _ = tokio::time::sleep(every) => {
                last = node.append(&format!("{prefix}{n}"), &["a", "b", "c"], 3);
                n += 1;
            }
        }
    }
}

/// Appends `count` records one at a time, each confirmed before the next:
/// no batch of the partition is queued behind a refused one. With one
/// queued, order rests on the broker refusing an idempotent producer's
/// out-of-sequence batch, which the mock cluster does not (it checks
/// sequences only for transactional producers), while librdkafka sends
/// what was queued before its purge after a fatal error. Apache Kafka 4.4
/// does refuse it: the batched versions of these paths are in
/// `tests/apache-kafka/sequence.rs`.
async fn append_paced(node: &Node, prefix: &str, count: usize) -> u64 {
    let mut last = 0;
    for n in 0..count {
        last = node.append(&format!("{prefix}{n}"), &["a", "b", "c"], 1);
        node.wait_committed(last, Duration::from_secs(60)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_occurrences_rise_across_outages_longer_than_the_message_timeout() {
    let kafka = cluster(2);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let running = node.start(&brokers, |k, _| k.message_timeout_ms = 700);
    let mut last = 0;
    for round in 0..3 {
        let up = append_until(
            &node,
            &format!("r{round}-"),
            Duration::from_millis(15),
            tokio::time::sleep(Duration::from_millis(400)),
        )
        .await;
        kafka.broker_down(1).unwrap();
        let _ = append_until(
            &node,
            &format!("d{round}-"),
            Duration::from_millis(15),
            tokio::time::sleep(Duration::from_millis(1_500)),
        )
        .await;
        kafka.broker_up(1).unwrap();
        last = append_until(
            &node,
            &format!("u{round}-"),
            Duration::from_millis(15),
            tokio::time::sleep(Duration::from_millis(600)),
        )
        .await
        .max(up);
    }
    node.wait_committed(last, Duration::from_secs(90)).await;
    running.shutdown().await;
    assert!(
        node.stats.retries.load(Ordering::Relaxed) >= 1,
        "{:?}",
        node.stats
    );
    assert_first_occurrences_rise(&read_topic(&brokers, TOPIC).await, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_occurrences_rise_when_in_flight_requests_time_out() {
    let kafka = cluster(2);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let running = node.start(&brokers, |k, _| k.message_timeout_ms = 800);
    let first = node.append("warm", &["a", "b"], 4);
    node.wait_committed(first, Duration::from_secs(30)).await;
    // Answers slower than the timeout for a while: requests are in flight
    // when their records time out.
    kafka
        .broker_round_trip_time(1, Duration::from_millis(1_200))
        .unwrap();
    let _ = append_until(
        &node,
        "slow",
        Duration::from_millis(20),
        tokio::time::sleep(Duration::from_millis(2_500)),
    )
    .await;
    kafka.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let last = append_until(
        &node,
        "fast",
        Duration::from_millis(20),
        tokio::time::sleep(Duration::from_millis(500)),
    )
    .await;
    node.wait_committed(last, Duration::from_secs(90)).await;
    running.shutdown().await;
    assert_first_occurrences_rise(&read_topic(&brokers, TOPIC).await, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_occurrences_rise_when_a_request_is_refused() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let running = node.start(&brokers, |k, _| k.linger_ms = 5);
    let first = node.append("warm", &["a"], 1);
    node.wait_committed(first, Duration::from_secs(30)).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(100))
        .unwrap();
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    let last = append_paced(&node, "ord", 30).await;
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    assert!(
        node.stats.isolated_retries.load(Ordering::Relaxed) >= 1,
        "{:?}",
        node.stats
    );
    assert_eq!(node.stats.dead_lettered_topic.load(Ordering::Relaxed), 0);
    assert_first_occurrences_rise(&read_topic(&brokers, TOPIC).await, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_occurrences_rise_across_a_refused_record_sent_to_the_dead_letters() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let running = node.start(&brokers, |k, _| k.linger_ms = 5);
    let first = node.append("warm", &["a"], 1);
    node.wait_committed(first, Duration::from_secs(30)).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(50))
        .unwrap();
    // The request is refused, then the first suspect alone is refused too:
    // it goes to the dead-letter topic, the rest is delivered in order.
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    let last = append_paced(&node, "dl", 30).await;
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    let dead_lettered = node.stats.dead_lettered_topic.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&dead_lettered),
        "each injected refusal condemns at most one record: {:?}",
        node.stats
    );
    // The dead-lettered records are the only ones missing from the topic,
    // and the topic's first occurrences still rise.
    let records = read_topic(&brokers, TOPIC).await;
    let dlq = read_topic(&brokers, super::DLQ).await;
    assert_eq!(dlq.len() as u64, dead_lettered);
    let mut all: BTreeSet<u64> = BTreeSet::new();
    for d in &dlq {
        all.insert(d.header("seq").unwrap().parse().unwrap());
    }
    let mut high: BTreeMap<i32, u64> = BTreeMap::new();
    for r in &records {
        let s: u64 = r.header("seq").unwrap().parse().unwrap();
        if all.insert(s) {
            let h = high.entry(r.partition).or_default();
            assert!(s > *h, "first occurrence of {s} after {h}");
            *h = s;
        } else {
            assert!(
                !dlq.iter().any(|d| d.header("seq") == r.header("seq")),
                "dead-lettered and delivered: {s}"
            );
        }
    }
    assert_eq!(
        all.len() as u64,
        last,
        "every record in the topic or the dead letters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_occurrences_rise_across_a_fatal_producer_error() {
    let kafka = cluster(2);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let running = node.start(&brokers, |k, _| k.linger_ms = 5);
    let first = node.append("warm", &["a", "b"], 4);
    node.wait_committed(first, Duration::from_secs(30)).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(50))
        .unwrap();
    // Head-of-line out-of-order sequence: fatal for an idempotent producer.
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let last = append_paced(&node, "f", 30).await;
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    assert!(
        node.stats.fatal_errors.load(Ordering::Relaxed) >= 1,
        "{:?}",
        node.stats
    );
    assert_first_occurrences_rise(&read_topic(&brokers, TOPIC).await, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_occurrences_rise_across_restarts_from_the_committed_offset() {
    let kafka = cluster(2);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    kafka
        .broker_round_trip_time(1, Duration::from_millis(30))
        .unwrap();
    let mut last = 0;
    for round in 0..4 {
        // A long commit interval leaves delivered records above the offset.
        let running = node.start(&brokers, |k, r| {
            k.linger_ms = 5;
            r.commit_interval_ms = 400;
        });
        last = append_until(
            &node,
            &format!("k{round}-"),
            Duration::from_millis(5),
            tokio::time::sleep(Duration::from_millis(500)),
        )
        .await;
        // Dies without the final commit, with records in flight.
        running.task.abort();
        let _ = running.task.await;
    }
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    assert_first_occurrences_rise(&read_topic(&brokers, TOPIC).await, last);
    assert!(
        node.stats.produced.load(Ordering::Relaxed) > last,
        "the restarts produced something again: {:?}",
        node.stats
    );
}
