//! The paths whose order relied on the broker refusing an idempotent
//! producer's out-of-sequence batch (design.md, "Ordering per partition"),
//! now against the broker that does (issue 27): a record over the topic's
//! `max.message.bytes` with batches of its partition in flight behind it,
//! batches over that limit, and the topic deleted under load. On the shared
//! SASL cluster: 3 nodes, replication factor 3, min.insync.replicas 2.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::secure::{
    self, judge, metric, phase, read, serve_as, topics, wait_stats, Acked, Load, USER, WITHIN,
};
use crate::support::apache_kafka::Cluster;
use crate::wait_delivered;

/// A message of `chars` random hex digits: lz4 cannot shrink it under the
/// topic's limit.
fn incompressible(chars: usize) -> String {
    let state = std::collections::hash_map::RandomState::new();
    let mut out = String::with_capacity(chars + 16);
    let mut i = 0u64;
    while out.len() < chars {
        let mut h = state.build_hasher();
        h.write_u64(i);
        out.push_str(&format!("{:016x}", h.finish()));
        i += 1;
    }
    out.truncate(chars);
    out
}

/// Lines of the brokers' logs that report an OutOfOrderSequenceException
/// for a partition of `topic`: the broker refusing a batch that came in
/// flight behind one it refused.
fn out_of_sequence_refusals(cluster: &Cluster, topic: &str) -> usize {
    cluster
        .nodes()
        .iter()
        .flat_map(|&n| {
            let dir = cluster.node_dir(n);
            ["server.log", "server.log.1", "server.log.2"].map(|f| dir.join(f))
        })
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|text| {
            text.lines()
                .filter(|l| {
                    l.contains("OutOfOrderSequenceException")
                        && l.contains(&format!("partition {topic}-"))
                })
                .count()
        })
        .sum()
}

/// The topic holds every acknowledged event but `condemned`, in order;
/// the dead-letter topic exactly `condemned`, each with the broker's error
/// and its own seq.
fn assert_landed(cluster: &Cluster, topic: &str, acked: &[Acked], condemned: &[Acked]) {
    let dlq = secure::read_n(cluster, &format!("{topic}-dlq"), condemned.len());
    let got: Vec<(String, u64)> = dlq
        .iter()
        .map(|r| {
            (
                r.header("id").unwrap().to_string(),
                r.header("seq").unwrap().parse().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = condemned.iter().map(|a| (a.id.clone(), a.seq)).collect();
    assert_eq!(
        got, want,
        "the dead-letter topic holds exactly the oversized records"
    );
    for r in &dlq {
        assert!(
            r.header("error").unwrap().contains("MessageSizeTooLarge"),
            "{:?}",
            r.headers
        );
        assert_eq!(r.header("original_topic"), Some(topic));
    }
    let v = judge(&read(cluster, topic));
    v.assert_ordered(topic);
    let condemned_ids: HashSet<&str> = condemned.iter().map(|a| a.id.as_str()).collect();
    let missing: Vec<_> = v
        .missing(acked)
        .into_iter()
        .filter(|a| !condemned_ids.contains(a.id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events neither in {topic} nor dead-lettered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for id in &condemned_ids {
        assert!(
            !v.ids.contains_key(*id),
            "{id} is in {topic} and dead-lettered"
        );
    }
}

#[test]
fn a_record_over_max_message_bytes_with_batches_in_flight_behind_it_goes_alone_to_the_dead_letters()
{
    let Some(cluster) = Cluster::shared_sasl() else {
        return;
    };
    let t0 = Instant::now();
    let topic = "big-events";
    topics(cluster, topic, 3, &[("max.message.bytes", "2000")], USER);
    // Batches stay under the topic's limit, so only the oversized record is
    // refused; a stall limit far above a round trip, so that replay never
    // gets past a refusal by timing out.
    let s = serve_as(
        cluster,
        USER,
        topic,
        &[
            ("SLUICE_KAFKA_BATCH_SIZE", "1000"),
            ("SLUICE_KAFKA_MESSAGE_TIMEOUT_MS", "60000"),
        ],
    );
    let addr = &s.daemon.addr;
    let load = Load::start(addr, "small", 1, 8, Duration::from_millis(50));
    load.wait_more(200);
    // Each round: an oversized record among records of its key (so of its
    // partition), batched behind it. Until the brokers logged refusing an
    // out-of-sequence batch, at most 5 rounds.
    let mut condemned = Vec::new();
    let mut around = Vec::new();
    for round in 0..5 {
        let big = format!("big-{round}");
        let events: Vec<_> = (0..60)
            .map(|i| {
                if i == 10 {
                    serde_json::json!({"id": big, "tenant_id": "k3", "source": "apache-kafka",
                        "message": incompressible(6_000)})
                } else {
                    secure::event(&format!("around-{round}-{i}"), "k3")
                }
            })
            .collect();
        let (status, got) = secure::post(addr, &events);
        assert_eq!(status, 202);
        condemned.push(got[10].clone());
        around.extend(got.into_iter().filter(|a| a.id != big));
        wait_stats(addr, "the oversized record dead-lettered", |s| {
            s["replay"]["dead_lettered_topic"].as_u64() == Some(round as u64 + 1)
        });
        eprintln!(
            "round {round}: dead-lettered after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        if out_of_sequence_refusals(cluster, topic) > 0 {
            break;
        }
    }
    load.wait_more(200);
    let (mut acked, refused) = load.finish();
    acked.extend(around);
    acked.extend(condemned.iter().cloned());
    let st = wait_delivered(addr, WITHIN);
    let oos = out_of_sequence_refusals(cluster, topic);
    assert!(
        oos > 0,
        "in {} rounds the brokers never refused an out-of-sequence batch",
        condemned.len()
    );
    assert_landed(cluster, topic, &acked, &condemned);
    // The refusal stopped the producer (gapless guarantee), and replay got
    // past it without waiting for its stall limit: the batches refused as
    // out of sequence went back to librdkafka's queue, which is purged.
    assert!(
        metric(addr, "sluice_kafka_fatal_errors_total") >= 1.0,
        "{st}"
    );
    assert_eq!(
        metric(addr, "sluice_replay_failures_total{kind=\"stall\"}"),
        0.0,
        "{st}"
    );
    assert_eq!(
        st["replay"]["dead_lettered_topic"].as_u64(),
        Some(condemned.len() as u64)
    );
    eprintln!(
        "{} acknowledged (non-202: {refused:?}), {} oversized dead-lettered in {} round(s); \
         {oos} out-of-sequence refusals in the brokers' logs; replay {}; {:.1} s",
        acked.len(),
        condemned.len(),
        condemned.len(),
        st["replay"],
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn batches_over_max_message_bytes_condemn_only_the_oversized_record() {
    let Some(cluster) = Cluster::shared_sasl() else {
        return;
    };
    let t0 = Instant::now();
    let topic = "oversize-batches";
    topics(cluster, topic, 3, &[("max.message.bytes", "2000")], USER);
    // sluice's default batch size (1 MB) against a 2,000-byte topic: the
    // requests are refused, and replay isolates their records, one at a
    // time. A second burst arrives while it does: records wait behind the
    // last suspect of the round, and go out in batches (refused again)
    // once it settled.
    let s = serve_as(cluster, USER, topic, &[]);
    let addr = &s.daemon.addr;
    let mut acked = Vec::new();
    let mut condemned = Vec::new();
    let burst = |name: &str, acked: &mut Vec<Acked>, condemned: &mut Vec<Acked>| {
        for batch in 0..5 {
            let events: Vec<_> = (0..20)
                .map(|i| {
                    if name == "first" && batch == 2 && i == 7 {
                        serde_json::json!({"id": "big", "tenant_id": "k1", "source": "apache-kafka",
                            "message": incompressible(6_000)})
                    } else {
                        secure::event(&format!("{name}-{batch}-{i}"), &format!("k{}", i % 4))
                    }
                })
                .collect();
            let (status, got) = secure::post(addr, &events);
            assert_eq!(status, 202);
            if name == "first" && batch == 2 {
                condemned.push(got[7].clone());
            }
            acked.extend(got);
        }
    };
    burst("first", &mut acked, &mut condemned);
    let t_isolating = Instant::now();
    while metric(addr, "sluice_replay_isolated_retries_total") < 1.0 {
        assert!(
            t_isolating.elapsed() < WITHIN,
            "replay never isolated: {}",
            crate::stats(addr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    burst("second", &mut acked, &mut condemned);
    let st = wait_delivered(addr, WITHIN);
    assert_landed(cluster, topic, &acked, &condemned);
    eprintln!(
        "{} acknowledged, 1 oversized dead-lettered; {} produced again alone; replay {}; {:.1} s",
        acked.len(),
        metric(addr, "sluice_replay_isolated_retries_total"),
        st["replay"],
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_topic_deleted_under_load_holds_replay_until_it_is_recreated() {
    let Some(cluster) = Cluster::shared_sasl() else {
        return;
    };
    let t0 = Instant::now();
    let topic = "gone-events";
    topics(cluster, topic, 3, &[], USER);
    let s = serve_as(
        cluster,
        USER,
        topic,
        &[("SLUICE_REPLAY_BACKOFF_MAX_MS", "2000")],
    );
    let addr = &s.daemon.addr;
    // librdkafka fails the records of a topic gone from the metadata after
    // topic.metadata.propagation.max.ms (30 s): a steady, modest load.
    let load = Load::start(addr, "gone", 3, 8, Duration::from_millis(200));
    let before = wait_stats(addr, "deliveries under way", |s| {
        s["replay"]["delivered_through"].as_u64() >= Some(500)
    })["replay"]["delivered_through"]
        .as_u64()
        .unwrap();
    phase(t0, "gone", "deleting the topic");
    cluster.delete_topic(topic);
    // Replay fails with the topic gone, then holds what it produced until
    // the topic is back; ingest goes on.
    let failing = wait_stats(addr, "kafka.failing says unknown_topic", |s| {
        s["kafka"]["failing"]["kind"] == "unknown_topic"
    });
    let gone = failing["replay"]["delivered_through"].as_u64().unwrap();
    let noticed = t0.elapsed();
    load.wait_more(1_000);
    let held = crate::stats(addr);
    assert_eq!(
        held["replay"]["delivered_through"].as_u64(),
        Some(gone),
        "{held}"
    );
    eprintln!(
        "deleted with delivered through {before}; {} after {:.1} s; delivered through {gone}",
        failing["kafka"]["failing"],
        noticed.as_secs_f64()
    );

    phase(t0, "gone", "recreating the topic");
    cluster.create_topic(topic, 3, &[]);
    phase(t0, "gone", "recreated");
    load.wait_more(500);
    let (acked, refused) = load.finish();
    let st = wait_delivered(addr, WITHIN);
    assert!(st["kafka"]["failing"].is_null(), "{st}");
    // Nothing was given up: no dead letters, no gaps.
    for k in ["dead_lettered_topic", "dead_lettered_file", "gap_records"] {
        assert_eq!(st["replay"][k], 0, "{k}: {st}");
    }
    // What was confirmed before the deletion went with the old topic; every
    // event after what was confirmed when replay noticed is in the new one.
    phase(t0, "gone", "delivered; reading back");
    let v = judge(&read(cluster, topic));
    v.assert_ordered(topic);
    let after: Vec<&Acked> = acked.iter().filter(|a| a.seq > gone).collect();
    let missing = v.missing(after.iter().copied());
    assert!(
        missing.is_empty(),
        "{} of {} events acknowledged after seq {gone} not in the recreated {topic}, e.g. {:?}",
        missing.len(),
        after.len(),
        &missing[..missing.len().min(5)]
    );
    let between = acked
        .iter()
        .filter(|a| a.seq > before && a.seq <= gone && v.ids.contains_key(&a.id))
        .count();
    eprintln!(
        "{} acknowledged (non-202: {refused:?}); {} after seq {gone}, all in the recreated topic \
         ({between} of seqs {}..={gone} too); replay {}; {:.1} s",
        acked.len(),
        after.len(),
        before + 1,
        st["replay"],
        t0.elapsed().as_secs_f64()
    );
}
