//! Faults on the shared cluster (3 broker-only nodes and a controller-only
//! one, RF 3, `min.insync.replicas=2`, sluice producing `acks=all`): a
//! broker stopped longer than replay's stall limit, two brokers down so
//! that `min.insync.replicas` cannot be met, and partitions added while
//! sluice replays. Each reads its topic back whole and applies the
//! consumer rule.

use std::time::{Duration, Instant};

use sluice::replay::partition::partition_for;

use crate::common::{log_of, metric, read_topic, serve_to, verdict, Load, LoadSpec, WITHIN};
use crate::support::apache_kafka::shared;
use crate::support::Serve;
use crate::{http, stats, wait_delivered};

/// Replay's stall limit in these cases (`kafka.message-timeout-ms`).
const STALL_MS: u64 = 10_000;

/// A `sluice serve` on `topic` (and `topic-dlq`) with the stall limit above.
fn serve(bootstrap: &str, topic: &str, data: &std::path::Path) -> Serve {
    serve_to(bootstrap, topic, data).envs(&[
        ("SLUICE_KAFKA_MESSAGE_TIMEOUT_MS", &STALL_MS.to_string()),
        // A small window, so that the records held by a silent leader fill
        // it within seconds and the stall check (no report from any
        // partition for the limit) fires.
        ("SLUICE_REPLAY_MAX_IN_FLIGHT", "2000"),
        ("RUST_LOG", "sluice=info"),
    ])
}

#[test]
fn a_broker_stopped_past_the_stall_limit_loses_nothing_and_keeps_order() {
    let Some(cluster) = shared() else {
        return;
    };
    let t_case = Instant::now();
    let topic = "stall";
    cluster.create_topic(topic, 3, &[("min.insync.replicas", "2")]);
    cluster.create_topic("stall-dlq", 1, &[("min.insync.replicas", "2")]);
    let tmp = tempfile::tempdir().unwrap();
    let daemon = serve(cluster.bootstrap(), topic, &tmp.path().join("data")).start();
    let load = Load::start(&daemon.addr, LoadSpec::default());
    load.wait_more(2_000);

    // SIGSTOP the leader of the hot tenant's partition: its sockets stay
    // open, requests to it get no answer, and the controller fences it
    // after broker.session.timeout.ms (9 s) and elects another leader.
    let hot = partition_for(Some(b"hot"), 1, 3);
    let leader = cluster.leader(topic, hot);
    assert!(leader > 0, "partition {hot} has no leader");
    let before = stats(&daemon.addr);
    let stop_for = Duration::from_millis(2 * STALL_MS + 5_000);
    cluster.stop(leader as u32);
    let t0 = Instant::now();
    eprintln!(
        "stall: SIGSTOP node {leader} (leader of partition {hot}) at seq {} for {stop_for:?}",
        before["replay"]["last_seq"]
    );
    let mut causes = Vec::new();
    while t0.elapsed() < stop_for {
        let s = stats(&daemon.addr);
        if let Some(c) = s["kafka"]["stall"]["cause"].as_str() {
            if causes.last().map(String::as_str) != Some(c) {
                causes.push(c.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let during = stats(&daemon.addr);
    let new_leader = cluster.leader(topic, hot);
    cluster.cont(leader as u32);
    eprintln!(
        "stall: SIGCONT node {leader} after {:.1} s; partition {hot} led by {new_leader} \
         meanwhile; replay {} ; stall causes seen {causes:?}",
        t0.elapsed().as_secs_f64(),
        during["replay"]
    );
    load.wait_more(2_000);
    let (acked, refused) = load.finish();
    let s = wait_delivered(&daemon.addr, WITHIN);
    let recovered = t0.elapsed();
    cluster.wait_in_sync(topic, WITHIN);
    let records = read_topic(cluster.bootstrap(), topic);
    let v = verdict(&acked, &records);
    let log = log_of(&daemon.log);
    let stalls = log
        .matches(&format!("no delivery report for {STALL_MS} ms"))
        .count();
    eprintln!(
        "stall: {}; non-202 {refused:?}; replay retries {}, stall checks fired {stalls}; \
         everything delivered {:.1} s after the stop; case {:.1} s",
        v.line(),
        s["replay"]["retries"],
        recovered.as_secs_f64(),
        t_case.elapsed().as_secs_f64()
    );
    // Ingest never noticed: every request got its 202.
    assert!(refused.is_empty(), "non-202 answers: {refused:?}");
    // design.md, "Message timeouts": librdkafka never times a record out;
    // replay's stall check dropped the producer, and the next one started
    // at the first unconfirmed record (first occurrences stay in order).
    assert!(
        stalls >= 1,
        "the stall check never fired in {stop_for:?} with node {leader} stopped"
    );
    v.assert_clean("stall");
    assert!(
        s["kafka"]["stall"].is_null(),
        "a delivery clears the stall: {}",
        s["kafka"]
    );
    drop(daemon);
}

#[test]
fn two_brokers_down_stall_replay_with_the_cause_named_and_ingest_goes_on() {
    let Some(cluster) = shared() else {
        return;
    };
    let t_case = Instant::now();
    let topic = "isr";
    cluster.create_topic(topic, 3, &[("min.insync.replicas", "2")]);
    cluster.create_topic("isr-dlq", 1, &[("min.insync.replicas", "2")]);
    let tmp = tempfile::tempdir().unwrap();
    let daemon = serve(cluster.bootstrap(), topic, &tmp.path().join("data")).start();
    let load = Load::start(&daemon.addr, LoadSpec::default());
    load.wait_more(2_000);

    // Two of three replicas gone: the controller (its own node) fences
    // them and shrinks every ISR to the survivor, below
    // min.insync.replicas, so the leader refuses acks=all writes.
    let (down, alive) = ([cluster.nodes()[1], cluster.nodes()[2]], cluster.nodes()[0]);
    for n in down {
        cluster.kill(n);
    }
    let t0 = Instant::now();
    eprintln!("isr: killed nodes {down:?}; node {alive} left");
    let stall = loop {
        let s = stats(&daemon.addr);
        if s["kafka"]["stall"]["cause"] == "not_enough_replicas" {
            break s;
        }
        assert!(
            t0.elapsed() < WITHIN,
            "replay never named NOT_ENOUGH_REPLICAS: {}",
            s["kafka"]
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let named_after = t0.elapsed();
    // Replay stalls while ingest continues into the WAL.
    let stuck_at = stall["replay"]["delivered_through"].as_u64().unwrap();
    let acked_then = load.acked();
    load.wait_more(1_000);
    let s = stats(&daemon.addr);
    assert_eq!(
        s["replay"]["delivered_through"].as_u64().unwrap(),
        stuck_at,
        "delivered with {down:?} down: {}",
        s["replay"]
    );
    assert!(s["replay"]["lag_records"].as_u64().unwrap() >= 1_000);
    let detail = s["kafka"]["stall"]["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("NOT_ENOUGH_REPLICAS")
            && detail.contains(&format!("topic {topic}"))
            && detail.contains("min.insync.replicas 2"),
        "{detail}"
    );
    // /ready says so without turning 503 (ingest must go on).
    let (status, body) = http(&daemon.addr, "GET", "/ready", b"");
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["kafka"]["stall"]["cause"], "not_enough_replicas");
    assert_eq!(
        metric(
            &daemon.addr,
            "sluice_replay_stalled{cause=\"not_enough_replicas\"}"
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &daemon.addr,
            "sluice_replay_stalls_total{cause=\"not_enough_replicas\"}"
        )
        .unwrap()
            >= 1.0
    );
    eprintln!(
        "isr: cause named {:.1} s after the kill: {detail}; {} events acknowledged \
         meanwhile, lag {}",
        named_after.as_secs_f64(),
        load.acked() - acked_then,
        s["replay"]["lag_records"]
    );

    let t1 = Instant::now();
    for n in down {
        cluster.restart(n);
    }
    load.wait_more(1_000);
    let (acked, refused) = load.finish();
    let s = wait_delivered(&daemon.addr, WITHIN);
    let drained = t1.elapsed();
    cluster.wait_in_sync(topic, WITHIN);
    let records = read_topic(cluster.bootstrap(), topic);
    let v = verdict(&acked, &records);
    eprintln!(
        "isr: {}; non-202 {refused:?}; delivered {:.1} s after the restarts began; case {:.1} s",
        v.line(),
        drained.as_secs_f64(),
        t_case.elapsed().as_secs_f64()
    );
    assert!(refused.is_empty(), "non-202 answers: {refused:?}");
    v.assert_clean("isr");
    assert!(s["kafka"]["stall"].is_null(), "{}", s["kafka"]);
    assert_eq!(
        metric(
            &daemon.addr,
            "sluice_replay_stalled{cause=\"not_enough_replicas\"}"
        ),
        Some(0.0)
    );
    drop(daemon);
}

/// A second stream into the same topic whose events carry no key.
const UNKEYED: &str = "/unkeyed";

#[test]
fn partitions_added_while_sluice_replays_keep_every_seq_on_one_partition() {
    let Some(cluster) = shared() else {
        return;
    };
    let t_case = Instant::now();
    let topic = "grow";
    cluster.create_topic(topic, 3, &[("min.insync.replicas", "2")]);
    cluster.create_topic("grow-dlq", 1, &[("min.insync.replicas", "2")]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[streams]]\nname = \"unkeyed\"\nroutes = [\"{UNKEYED}\"]\ntopic = \"{topic}\"\n\
             dead-letter-topic = \"grow-dlq\"\nkey-field = \"no_such_field\"\n"
        ),
    )
    .unwrap();
    let start = || {
        serve(cluster.bootstrap(), topic, &data)
            .arg("--config")
            .arg(&config)
            // Kills land between confirmed deliveries and the offset
            // flush: records produced again after the restart.
            .envs(&[("SLUICE_DEBUG_PAUSE", "flush=20")])
            .start()
    };
    let daemon = start();
    let load = Load::start(
        &daemon.addr,
        LoadSpec {
            unkeyed_route: Some(UNKEYED),
            ..LoadSpec::default()
        },
    );
    load.wait_more(2_000);

    // CreatePartitions on the live cluster: replay asks the metadata again
    // within 30 s and pins 6 from a boundary above everything produced.
    cluster.add_partitions(topic, 6);
    let t0 = Instant::now();
    while metric(&daemon.addr, "sluice_replay_partition_changes_total") < Some(1.0) {
        assert!(
            t0.elapsed() < WITHIN,
            "the new partition count was never pinned"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let noticed = t0.elapsed();
    load.wait_more(2_000);

    // kill -9 under load, grow again while sluice is down, restart: what
    // was produced and not flushed is produced again under its old pin.
    let before_kill = stats(&daemon.addr);
    daemon.kill_9();
    cluster.add_partitions(topic, 9);
    let daemon = start();
    load.set_addr(&daemon.addr);
    load.wait_more(2_000);
    let (acked, refused) = load.finish();
    let s = wait_delivered(&daemon.addr, WITHIN);
    let changes = metric(&daemon.addr, "sluice_replay_partition_changes_total");
    let log = log_of(&daemon.log);
    let records = read_topic(cluster.bootstrap(), topic);
    let v = verdict(&acked, &records);
    eprintln!(
        "grow: 3 -> 6 pinned {:.1} s after CreatePartitions; killed at {} (committed {}); \
         6 -> 9 while down, restarted: changes counted {changes:?}; {}; non-202 {refused:?}; \
         case {:.1} s",
        noticed.as_secs_f64(),
        before_kill["replay"]["last_seq"],
        before_kill["replay"]["committed"],
        v.line(),
        t_case.elapsed().as_secs_f64()
    );
    v.assert_clean("grow");
    // The growth took effect: records above the boundaries use the new
    // partitions.
    let on = |from: i32, to: i32| -> usize {
        v.per_partition
            .range(from..to)
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    assert!(
        on(3, 6) > 0,
        "nothing on partitions 3-5: {:?}",
        v.per_partition
    );
    assert!(
        on(6, 9) > 0,
        "nothing on partitions 6-8: {:?}",
        v.per_partition
    );
    assert!(changes >= Some(1.0), "{log}");
    // Only the kill may cost answers (connection refused while down).
    assert!(
        refused.keys().all(|&st| st == 0),
        "non-202 answers: {refused:?}"
    );
    assert_eq!(s["replay"]["lag_records"], 0);
}
