//! `sluice wal redrive` from one Apache Kafka cluster to another (README,
//! "Re-driving records": failing over to a backup cluster): records
//! delivered to the shared 3-broker cluster and still in the WAL are sent
//! to a second, 1-node cluster; a longer range from the same `--from` and
//! the same run again add nothing after the consumer rule.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::common::{light_load, read_topic, serve_to, verdict, WITHIN};
use crate::support::apache_kafka::{shared, Cluster};
use crate::support::EXE;
use crate::{stats, wait_delivered};

const SOURCE: &str = "redrive-src";
const TARGET: &str = "events";

/// One run; its JSON summary (stdout), exit 0 asserted.
fn redrive(data: &std::path::Path, through: u64, brokers: &str) -> serde_json::Value {
    let out = Command::new(EXE)
        .args(["wal", "redrive", "--data-dir"])
        .arg(data)
        .args(["--from", "1", "--through", &through.to_string()])
        .args(["--brokers", brokers, "--topic", TARGET])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redrive through {through}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_wal_range_redriven_to_a_second_cluster_arrives_once_after_the_rule() {
    let t_case = Instant::now();
    // The target first, before this test's turn on the shared cluster.
    let Some(target) = Cluster::start(1) else {
        return;
    };
    target.create_topic(TARGET, 3, &[]);
    let target_up = t_case.elapsed();
    let Some(cluster) = shared() else {
        return;
    };
    cluster.create_topic(SOURCE, 3, &[("min.insync.replicas", "2")]);
    cluster.create_topic("redrive-src-dlq", 1, &[("min.insync.replicas", "2")]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // 64 MiB segments (the default): everything stays in the active
    // segment, which GC never deletes.
    let daemon = serve_to(cluster.bootstrap(), SOURCE, &data).start();
    let load = light_load(&daemon.addr, 1);
    load.wait_more(3_000);
    let (acked, _) = load.finish();
    let s = wait_delivered(&daemon.addr, WITHIN);
    let instance = stats(&daemon.addr)["instance"]
        .as_str()
        .unwrap()
        .to_string();
    let last = s["replay"]["last_seq"].as_u64().unwrap();
    assert!(daemon.stop().success());

    // Half the range, all of it, and all of it again.
    let t0 = Instant::now();
    let half = redrive(&data, last / 2, target.bootstrap());
    let whole = redrive(&data, last, target.bootstrap());
    let again = redrive(&data, last, target.bootstrap());
    let runs = t0.elapsed();
    for (run, n) in [(&half, last / 2), (&whole, last), (&again, last)] {
        assert_eq!(run["delivered"], n, "{run}");
        assert_eq!(run["failed"], 0, "{run}");
        assert_eq!(run["origin_instance"], instance.as_str(), "{run}");
    }
    // One identity for the three runs (same source, --from and topic).
    assert_eq!(half["instance"], whole["instance"]);
    assert_eq!(whole["instance"], again["instance"]);

    let records = read_topic(target.bootstrap(), TARGET);
    let v = verdict(&acked, &records);
    let source = read_topic(cluster.bootstrap(), SOURCE);
    // Each re-sent record carries its first identity and keeps its key.
    let origin: HashMap<&str, (&str, Option<&String>)> = source
        .iter()
        .map(|r| {
            (
                r.header("id").unwrap(),
                (r.header("seq").unwrap(), r.key.as_ref()),
            )
        })
        .collect();
    let mut mismatched = 0;
    for r in &records {
        let (seq, key) = origin[r.header("id").unwrap()];
        let redrive_seq: u64 = r.header("seq").unwrap().parse().unwrap();
        if r.header("origin-instance") != Some(instance.as_str())
            || r.header("origin-seq") != Some(seq)
            || redrive_seq.to_string() != seq
            || r.key.as_ref() != key
            || r.header("instance") != whole["instance"].as_str()
        {
            mismatched += 1;
        }
    }
    eprintln!(
        "redrive: target cluster (1 node) ready in {:.1} s; {last} records from the 3-broker \
         cluster, runs 1..{} then 1..{last} twice in {:.1} s: {}; identity mismatches \
         {mismatched}; case {:.1} s",
        target_up.as_secs_f64(),
        last / 2,
        runs.as_secs_f64(),
        v.line(),
        t_case.elapsed().as_secs_f64()
    );
    assert_eq!(records.len() as u64, last / 2 + 2 * last);
    assert_eq!(v.dropped_by_rule as u64, last / 2 + last);
    v.assert_clean("redrive");
    assert_eq!(v.unacknowledged, 0);
    assert_eq!(mismatched, 0);
}
