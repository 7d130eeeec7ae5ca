//! The normal path: end to end, restart, GC ordering, per-tenant order,
//! bounded memory with a large backlog.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sluice::config::Config;
use sluice::http::{app, AppState};
use tower::ServiceExt;

use super::{cluster, id_counts, read_topic, Node, TOPIC};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_wal_to_kafka_with_key_value_and_headers() {
    let kafka = cluster(3);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let config = Config {
        data_dir: node.dir.path().to_path_buf(),
        ..Config::default()
    };
    let state = Arc::new(AppState::new(
        &config,
        node.wal.clone(),
        node.offsets.clone(),
    ));
    let node = Node {
        stats: state.replay.clone(),
        ..node
    };
    let running = node.start(&brokers, |_, _| {});
    let mut sent = BTreeMap::new();
    let mut last_seq = 0;
    for b in 0..5 {
        let events: Vec<Value> = (0..20)
            .map(|i| {
                let id = format!("e2e-{b}-{i}");
                let tenant = ["acme", "beta", "gamma"][i % 3];
                sent.insert(id.clone(), tenant);
                json!({"id": id, "tenant_id": tenant, "source": " Web ", "message": format!(" m{i} ")})
            })
            .collect();
        let resp = app(state.clone())
            .oneshot(
                Request::post("/v1/events")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(Value::Array(events).to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let body: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        last_seq = body["last_seq"].as_u64().unwrap();
    }
    node.wait_committed(last_seq, Duration::from_secs(30)).await;
    let receipt = app(state.clone())
        .oneshot(
            Request::get(format!("/v1/receipts/{last_seq}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let receipt: Value =
        serde_json::from_slice(&receipt.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(receipt["delivered"], true);

    let records = read_topic(&brokers, TOPIC).await;
    assert_eq!(
        records.len(),
        100,
        "each accepted event exactly once (no failures)"
    );
    let mut seqs = Vec::new();
    for r in &records {
        let id = r.header("id").unwrap();
        let tenant = sent[id];
        assert_eq!(r.key.as_deref(), Some(tenant));
        assert_eq!(r.header("tenant"), Some(tenant));
        assert!(r.header("received_at").unwrap().ends_with('Z'));
        seqs.push(r.header("seq").unwrap().parse::<u64>().unwrap());
        assert_eq!(r.value["id"], id);
        assert_eq!(r.value["source"], "web");
        assert!(r.value["message"].as_str().unwrap().starts_with('m'));
        assert_eq!(r.value["severity"], "INFO");
    }
    seqs.sort();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    let stats = state.replay.clone();
    assert!(stats.connected.load(Ordering::Relaxed));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_committed_offset() {
    let kafka = cluster(2);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let first = node.append("r1", &["a", "b"], 300);
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(first, Duration::from_secs(30)).await;
    running.shutdown().await;
    let committed = node.offsets.committed().unwrap();
    assert_eq!(committed, first, "shutdown flushes the offset");

    // Records appended while replay is down are picked up after restart,
    // and nothing below the committed offset is produced again.
    let last = node.append("r2", &["a", "b"], 200);
    let stats = Arc::new(sluice::replay::ReplayStats::default());
    let node = Node { stats, ..node };
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(last, Duration::from_secs(30)).await;
    assert_eq!(
        node.stats.produced.load(Ordering::Relaxed),
        last - committed,
        "resumed exactly after the committed offset"
    );
    running.shutdown().await;
    let counts = id_counts(&read_topic(&brokers, TOPIC).await);
    assert_eq!(counts.len(), 500);
    assert!(
        counts.values().all(|&n| n == 1),
        "no duplicates after a clean restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_segments_only_after_the_offset_is_flushed() {
    let kafka = cluster(1);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let last = node.append("gc", &["a"], 400);
    let segments_before = node.wal.stats().segments;
    assert!(segments_before > 5, "4 KiB segments: {segments_before}");
    // Flushes come every few ms while deliveries run. Whenever sampled, the
    // oldest retained record is at most one past the flushed offset: GC
    // never deleted anything the flushed offset does not cover. (WAL first,
    // then the offset: GC only follows a flush, so this order cannot race.)
    let running = node.start(&brokers, |_, _| {});
    let t0 = std::time::Instant::now();
    while node.stats.delivered_through.load(Ordering::Relaxed) < last {
        assert!(t0.elapsed() < Duration::from_secs(30));
        let first = node.wal.stats().first_seq.unwrap_or(u64::MAX);
        let committed = node.offsets.committed().unwrap();
        assert!(
            first == u64::MAX || first <= committed + 1,
            "GC deleted records above the flushed offset: first {first}, committed {committed}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Shutdown flushes the offset, then GC runs.
    running.shutdown().await;
    assert_eq!(node.offsets.committed().unwrap(), last);
    assert_eq!(
        node.wal.stats().segments,
        1,
        "only the active segment is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_preserved_per_tenant() {
    let kafka = cluster(3);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let last = node.append("ord", &["t1", "t2", "t3", "t4", "t5"], 1000);
    let running = node.start(&brokers, |_, _| {});
    node.wait_committed(last, Duration::from_secs(30)).await;
    running.shutdown().await;
    let mut records = read_topic(&brokers, TOPIC).await;
    records.sort_by_key(|r| (r.partition, r.offset));
    let mut per_tenant: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &records {
        per_tenant
            .entry(r.key.clone().unwrap())
            .or_default()
            .push(r.value["n"].as_u64().unwrap());
    }
    assert_eq!(per_tenant.len(), 5);
    for (tenant, ns) in per_tenant {
        assert_eq!(ns.len(), 200);
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{tenant} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_backlog_replays_with_bounded_in_flight_records() {
    let kafka = cluster(2);
    let brokers = kafka.bootstrap_servers();
    let node = Node::temp();
    let last = node.append("bl", &["a", "b", "c"], 20_000);
    let segments = node.wal.stats().segments;
    let running = node.start(&brokers, |_, r| r.max_in_flight = 256);
    node.wait_committed(last, Duration::from_secs(60)).await;
    running.shutdown().await;
    let peak = node.stats.peak_in_flight.load(Ordering::Relaxed);
    assert!(peak <= 256, "in flight peaked at {peak}");
    assert!(peak > 16, "the pipeline was actually used: {peak}");
    assert_eq!(node.stats.produced.load(Ordering::Relaxed), last);
    assert!(segments > 100);
    assert_eq!(
        node.wal.stats().segments,
        1,
        "every consumed segment collected"
    );
}
