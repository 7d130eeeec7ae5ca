//! Failure paths: outages longer than the message timeout, retriable and
//! permanent produce errors, dead-letter topic and dead-letter file.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sluice::replay::offsets::{Fate, OffsetStore};

use super::{cluster, id_counts, read_topic, Node, DLQ, TOPIC};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_longer_than_the_message_timeout_reproduces_and_loses_nothing() {
    let kafka = cluster(2);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let before = node.append("pre", &["a", "b"], 100);
    let running = node.start(&brokers, |k, _| k.message_timeout_ms = 1_000);
    node.wait_committed(before, Duration::from_secs(30)).await;

    kafka.broker_down(1).unwrap();
    // Ingest goes on while Kafka is away.
    let during = node.append("during", &["a", "b"], 300);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(
        node.stats.retries.load(Ordering::Relaxed) >= 1,
        "timed-out records were given up by librdkafka and scheduled again: {:?}",
        node.stats
    );
    assert!(!node.stats.connected.load(Ordering::Relaxed));
    assert!(node.offsets.committed().unwrap() < during);
    kafka.broker_up(1).unwrap();
    node.wait_committed(during, Duration::from_secs(60)).await;
    assert!(node.stats.connected.load(Ordering::Relaxed));
    running.shutdown().await;

    let counts = id_counts(&read_topic(&brokers, TOPIC).await);
    assert_eq!(counts.len(), 400, "every record delivered at least once");
    assert!((0..300).all(|n| counts.contains_key(&format!("during-{n}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_without_loss() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let node = Node::temp();
    let last = node.append("retry", &["a"], 50);
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(last, Duration::from_secs(30)).await;
    running.shutdown().await;
    let counts = id_counts(&read_topic(&brokers, TOPIC).await);
    assert_eq!(counts.len(), 50);
    assert_eq!(node.stats.dead_lettered_topic.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_go_to_the_dead_letter_topic_with_headers() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    // Deliver one record first so the producer is connected, then make the
    // next produce request fail permanently.
    let first = node.append("ok", &["a"], 1);
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(first, Duration::from_secs(30)).await;
    // Two failures: the request carrying "bad" (and maybe its neighbours),
    // then "bad" produced alone. Neighbours succeed when produced alone.
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    let bad = node.append("bad", &["a"], 1);
    let after = node.append("after", &["a"], 5);
    node.wait_committed(after, Duration::from_secs(30)).await;
    running.shutdown().await;

    assert_eq!(node.stats.dead_lettered_topic.load(Ordering::Relaxed), 1);
    let dlq = read_topic(&brokers, DLQ).await;
    assert_eq!(dlq.len(), 1);
    let d = &dlq[0];
    assert_eq!(d.header("id"), Some("bad-0"));
    assert_eq!(d.header("seq"), Some(bad.to_string().as_str()));
    assert_eq!(d.header("original_topic"), Some(TOPIC));
    assert!(
        d.header("error").unwrap().contains("too large"),
        "{:?}",
        d.headers
    );
    assert_eq!(d.key.as_deref(), Some("a"));
    assert_eq!(d.value["id"], "bad-0");
    let main = id_counts(&read_topic(&brokers, TOPIC).await);
    assert!(!main.contains_key("bad-0"));
    // Receipts say so, from the offset store, across a reopen.
    let Node { dir, offsets, .. } = node;
    drop(offsets);
    let store = OffsetStore::open(&dir.path().join("offsets")).unwrap();
    assert_eq!(store.fate(bad).unwrap(), Some(Fate::DeadLetteredTopic));
    assert_eq!(store.fate(bad + 1).unwrap(), None);
    assert!(
        (0..5).all(|n| main.contains_key(&format!("after-{n}"))),
        "innocent neighbours are delivered, not dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_dead_letter_topic_refuses_too_the_record_goes_to_the_file() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let first = node.append("ok", &["a"], 1);
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(first, Duration::from_secs(30)).await;
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
        ],
    );
    let bad = node.append("doomed", &["a"], 1);
    node.wait_committed(bad, Duration::from_secs(30)).await;
    running.shutdown().await;
    assert_eq!(node.stats.dead_lettered_file.load(Ordering::Relaxed), 1);
    let path = node.dir.path().join("dead-letter/dead-letter.ndjson");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["seq"], bad);
    assert_eq!(lines[0]["topic"], TOPIC);
    assert_eq!(lines[0]["headers"]["id"], "doomed-0");
    assert_eq!(lines[0]["value"]["json"]["id"], "doomed-0");
    assert!(lines[0]["error"].as_str().unwrap().contains("too large"));
    let Node { dir, offsets, .. } = node;
    drop(offsets);
    let store = OffsetStore::open(&dir.path().join("offsets")).unwrap();
    assert_eq!(store.fate(bad).unwrap(), Some(Fate::DeadLetteredFile));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_idempotent_producer_error_recreates_the_producer() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let first = node.append("pre", &["a"], 10);
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(first, Duration::from_secs(30)).await;
    // An out-of-order sequence answer is fatal for an idempotent producer:
    // librdkafka never recovers by itself, so sluice must build a new producer.
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let last = node.append("post", &["a"], 20);
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    assert!(
        node.stats.fatal_errors.load(Ordering::Relaxed) >= 1,
        "{:?}",
        node.stats
    );
    assert!(node.stats.producer_recreations.load(Ordering::Relaxed) >= 1);
    let counts = id_counts(&read_topic(&brokers, TOPIC).await);
    assert!((0..20).all(|n| counts.contains_key(&format!("post-{n}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolating_a_refused_request_keeps_the_tenants_order() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let first = node.append("warm", &["a"], 1);
    let running = node.start(&brokers, |k, _| k.linger_ms = 200);
    node.wait_committed(first, Duration::from_secs(30)).await;
    // The next produce request is refused for good; its records are fine
    // alone, so nothing is dead-lettered. The answer takes 100 ms, so the
    // next linger window's records are queued when it comes back.
    kafka
        .broker_round_trip_time(1, Duration::from_millis(100))
        .unwrap();
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    // 50 records, one every 10 ms, over several 200 ms linger windows.
    let mut last = 0;
    for n in 0..50 {
        last = node.append(&format!("ord{n}"), &["a"], 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    assert!(node.stats.isolated_retries.load(Ordering::Relaxed) >= 1);
    assert_eq!(node.stats.dead_lettered_topic.load(Ordering::Relaxed), 0);

    let records = read_topic(&brokers, TOPIC).await;
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| r.header("seq").unwrap().parse().unwrap())
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let firsts: Vec<u64> = seqs.iter().copied().filter(|&s| seen.insert(s)).collect();
    assert_eq!(
        firsts.len() as u64,
        last,
        "every record delivered: {seqs:?}"
    );
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "first occurrences must rise: {seqs:?}"
    );
}
