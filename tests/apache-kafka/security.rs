//! SASL/SCRAM over TLS and ACLs on the real broker (issue 27): the
//! README's and docs/security.md's SASL snippets as written, and a
//! principal whose write permission is removed with batches in flight.
//! Both on the shared SASL cluster: 3 nodes, replication factor 3,
//! min.insync.replicas 2, KRaft's StandardAuthorizer.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::secure::{
    self, judge, metric, phase, read, serve_as, serve_with_config, topics, wait_stats, Load, USER,
    WITHIN,
};
use crate::support::apache_kafka::{Cluster, Resource};
use crate::{http, wait_delivered};

/// The first ```toml block of `doc` (relative to the repository) that sets
/// `"security.protocol" = "SASL_SSL"`, verbatim.
fn documented_sasl_snippet(doc: &str) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc)).unwrap();
    text.split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split_once("\n```").map(|(b, _)| b))
        .find(|b| b.contains("\"security.protocol\" = \"SASL_SSL\""))
        .unwrap_or_else(|| panic!("{doc} has no SASL_SSL snippet"))
        .to_string()
}

/// `snippet` with its placeholders (brokers, password, CA file) replaced
/// by the cluster's, every other line as written. Panics when one of them
/// is missing: a snippet without `ssl.ca.location` cannot reach brokers
/// whose CA is not in the system's store, as in most private clusters.
fn fill(snippet: &str, cluster: &Cluster) -> String {
    let mut replaced = Vec::new();
    let lines: Vec<String> = snippet
        .lines()
        .map(|line| {
            let key = line.split('=').next().unwrap_or("").trim();
            let value = match key {
                "brokers" => cluster.sasl_bootstrap(),
                "\"sasl.password\"" => cluster.password(USER),
                "\"ssl.ca.location\"" => cluster.ca_file().display().to_string(),
                "\"sasl.username\"" => {
                    assert!(line.contains(&format!("\"{USER}\"")), "{line}");
                    return line.to_string();
                }
                _ => return line.to_string(),
            };
            replaced.push(key.to_string());
            format!("{key} = \"{value}\"")
        })
        .collect();
    for key in ["brokers", "\"sasl.password\"", "\"ssl.ca.location\""] {
        assert!(
            replaced.iter().any(|k| k == key),
            "the snippet sets no {key}:\n{snippet}"
        );
    }
    lines.join("\n") + "\n"
}

#[test]
fn the_documented_sasl_scram_over_tls_settings_deliver() {
    let Some(cluster) = Cluster::shared_sasl() else {
        return;
    };
    let t0 = Instant::now();
    let topic = "sasl-events";
    topics(cluster, topic, 3, &[], USER);
    // Read back as the same SASL user through Kafka's own Java consumer.
    let principal = format!("User:{USER}");
    cluster.acl_add(&principal, &["Read"], Resource::Topic(topic));
    cluster.acl_add(&principal, &["Read"], Resource::Group("sasl-check"));

    let readme = fill(&documented_sasl_snippet("README.md"), cluster);
    let security = fill(&documented_sasl_snippet("docs/security.md"), cluster);
    assert!(security.contains("SCRAM-SHA-512"), "{security}");
    let sha256 = security.replace("SCRAM-SHA-512", "SCRAM-SHA-256");
    let runs: Vec<_> = [
        ("readme", &readme),
        ("security-md", &security),
        ("sha256", &sha256),
    ]
    .into_iter()
    .map(|(name, toml)| (name, serve_with_config(toml, topic, &[])))
    .collect();
    let mut acked = Vec::new();
    for (name, s) in &runs {
        for batch in 0..5 {
            let events: Vec<_> = (0..20)
                .map(|i| secure::event(&format!("{name}-{batch}-{i}"), &format!("k{}", i % 4)))
                .collect();
            let (status, got) = secure::post(&s.daemon.addr, &events);
            assert_eq!(status, 202);
            acked.extend(got);
        }
    }
    for (name, s) in &runs {
        let st = wait_delivered(&s.daemon.addr, WITHIN);
        assert_eq!(st["kafka"]["connected"], true, "{name}: {st}");
        assert_eq!(st["replay"]["dead_lettered_topic"], 0, "{name}: {st}");
    }
    // Each event once per run in the topic, in order.
    let v = judge(&read(cluster, topic));
    v.assert_ordered(topic);
    let missing = v.missing(&acked);
    assert!(
        missing.is_empty(),
        "not in {topic}: {:?}",
        &missing[..missing.len().min(5)]
    );
    let values = cluster.consume_values(topic, acked.len(), Some((USER, "sasl-check")));
    let ids: std::collections::HashSet<String> = values
        .iter()
        .filter_map(|v| serde_json::from_str::<serde_json::Value>(v).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect();
    let unread: Vec<_> = acked.iter().filter(|a| !ids.contains(&a.id)).collect();
    assert!(
        unread.is_empty(),
        "the Java consumer over SASL_SSL did not read {:?}",
        &unread[..unread.len().min(5)]
    );
    drop(runs);

    // What goes wrong says so: the snippet without the CA (as the README
    // had it), and a wrong password. Nothing is delivered or given up.
    let no_ca: String = readme
        .lines()
        .filter(|l| !l.starts_with("\"ssl.ca.location\""))
        .map(|l| format!("{l}\n"))
        .collect();
    let bad_password = readme.replace(&cluster.password(USER), "not-the-password");
    for (toml, kind, words) in [
        (&no_ca, "tls", "certificate verify failed"),
        (&bad_password, "authorization", "SASL authentication error"),
    ] {
        let s = serve_with_config(toml, topic, &[]);
        let (status, _) =
            secure::post(&s.daemon.addr, &[secure::event(&format!("{kind}-0"), "k0")]);
        assert_eq!(status, 202);
        let st = wait_stats(&s.daemon.addr, kind, |s| {
            s["kafka"]["failing"]["kind"] == kind
        });
        let failing = &st["kafka"]["failing"];
        assert!(
            failing["client_error"]
                .as_str()
                .unwrap_or("")
                .contains(words),
            "{failing}"
        );
        assert_eq!(st["replay"]["delivered_through"], 0, "{st}");
        eprintln!("{kind}: {failing}");
    }
    eprintln!(
        "{} events over SASL_SSL (README snippet, security.md snippet, SCRAM-SHA-256) read back by the \
         Java consumer as {USER}; no CA and a bad password said so: {:.1} s",
        acked.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_principal_losing_write_permission_mid_run_stalls_replay_until_it_is_restored() {
    let Some(cluster) = Cluster::shared_sasl() else {
        return;
    };
    let t0 = Instant::now();
    let (user, topic) = ("acl-revoked", "acl-events");
    cluster.user_add(user, "acl-revoked-secret");
    topics(cluster, topic, 3, &[], user);
    // A short backoff cap: the ACL comes back while replay is backing off.
    let s = serve_as(
        cluster,
        user,
        topic,
        &[("SLUICE_REPLAY_BACKOFF_MAX_MS", "2000")],
    );
    let addr = &s.daemon.addr;
    let load = Load::start(addr, "acl", 3, 8, Duration::from_millis(100));
    load.wait_more(1_000);
    phase(t0, "acl", "1,000 acknowledged; removing Write");
    let principal = format!("User:{user}");
    cluster.acl_remove(&principal, &["Write"], Resource::Topic(topic));
    let revoked = crate::stats(addr)["replay"]["last_seq"].as_u64().unwrap();

    // Replay backs off and retries; ingest goes on; /stats, /ready and the
    // metrics say why.
    let failing = wait_stats(addr, "kafka.failing says authorization", |s| {
        s["kafka"]["failing"]["kind"] == "authorization"
    });
    phase(t0, "acl", "kafka.failing says authorization");
    // Once every broker denies the write, nothing more is delivered.
    load.wait_more(500);
    let stalled = crate::stats(addr)["replay"]["delivered_through"]
        .as_u64()
        .unwrap();
    load.wait_more(500);
    let (status, ready) = http(addr, "GET", "/ready", b"");
    assert_eq!(status, 200, "ingest is unaffected: {ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(
        ready["kafka"]["failing"]["kind"], "authorization",
        "{ready}"
    );
    let during = crate::stats(addr);
    assert_eq!(
        during["replay"]["delivered_through"].as_u64().unwrap(),
        stalled,
        "delivered without Write: {during}"
    );
    assert!(metric(addr, "sluice_replay_failures_total{kind=\"authorization\"}") >= 1.0);
    assert_eq!(metric(addr, "sluice_kafka_connected"), 0.0);
    eprintln!(
        "Write removed at seq {revoked}: {}; delivered through {} of {}",
        failing["kafka"]["failing"],
        during["replay"]["delivered_through"],
        during["replay"]["last_seq"]
    );

    cluster.acl_add(&principal, &["Write"], Resource::Topic(topic));
    phase(t0, "acl", "Write restored");
    load.wait_more(500);
    let (acked, refused) = load.finish();
    let st = wait_delivered(addr, WITHIN);
    assert!(st["kafka"]["failing"].is_null(), "{st}");
    assert_eq!(st["kafka"]["connected"], true, "{st}");
    // Authorization is not the record's fault: nothing is dead-lettered.
    assert_eq!(st["replay"]["dead_lettered_topic"], 0, "{st}");
    assert_eq!(st["replay"]["dead_lettered_file"], 0, "{st}");

    let v = judge(&read(cluster, topic));
    v.assert_ordered(topic);
    let missing = v.missing(&acked);
    assert!(
        missing.is_empty(),
        "{} acknowledged events not in {topic}, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    phase(t0, "acl", "read back");
    eprintln!(
        "{} acknowledged (non-202: {refused:?}), all in {topic}; {} repeats dropped by the rule; \
         {} authorization failures; replay {}; {:.1} s",
        acked.len(),
        v.dropped_by_rule,
        metric(addr, "sluice_replay_failures_total{kind=\"authorization\"}"),
        st["replay"],
        t0.elapsed().as_secs_f64()
    );
}
