//! `sluice archive` when the partition's offsets are not what the
//! checkpoint says: a topic that started over (another cluster, a recreated
//! topic), a group whose committed offsets cannot be read, and consumer
//! settings the archiver's rebalance handling does not support.

use super::*;

impl Archiver {
    /// The exit status once the archiver exited by itself, None if it still
    /// runs after `within`.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, within)
    }

    /// The log without terminal colours.
    pub(super) fn log_text(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // ESC [ ... letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The value of one sample line of /metrics (`name{labels}`), 0 if absent.
    pub(super) fn metric(&self, sample: &str) -> u64 {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

pub(super) fn wait_child(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if t0.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Produces `n` records of `instance` from seq `from` (partition seq % 3).
fn produce(brokers: &str, instance: &str, from: u64, n: u64, ledger: &mut Vec<String>) {
    let mut src = Source::new(brokers, instance);
    src.next_seq = from;
    for _ in 0..n {
        let seq = src.next();
        ledger.push(ledger_id(instance, seq));
    }
    src.flush();
}

/// Archives `n` records from a first dev broker and stops cleanly: the
/// checkpoint holds next offset 20 for each of the 3 partitions.
fn archive_first_cluster(tmp: &Path, dir: &Path, cfg: &Path, n: u64) -> Vec<String> {
    let broker = Broker::start(tmp, Some(3));
    let mut ledger = Vec::new();
    let a = Archiver::start(dir, &broker.addr, "reset", cfg);
    produce(&broker.addr, "i1", 1, n, &mut ledger);
    let all = wait_complete(&[dir], ledger.len());
    assert_exactly_once(&all, &ledger);
    assert!(a.stop().success());
    ledger
}

#[test]
fn a_topic_whose_offsets_started_over_fails_loudly_by_default_and_restart_archives_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("archive");
    let cfg = config(tmp.path(), "");
    let mut ledger = archive_first_cluster(tmp.path(), &dir, &cfg, 60);
    // Failover: a second cluster with the same topic, and 40 new events of
    // the same producer (its seqs continue), at offsets 0..~13 per partition.
    let tmp2 = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp2.path(), Some(3));
    produce(&broker.addr, "i1", 61, 40, &mut ledger);

    // Default policy: refuse, exit non-zero, say what and where.
    let mut a = Archiver::start(&dir, &broker.addr, "reset", &cfg);
    let st = a.wait_exit(WITHIN);
    let archived = recount(&dir).0.len();
    assert!(
        st.is_some_and(|s| !s.success()),
        "the archiver is still running (or exited 0) with {} of 40 new records archived:\n{}",
        archived - 60,
        a.log_text()
    );
    let log = a.log_text();
    for want in [
        "offset reset on topic events partition",
        "the archive's next offset is 20 in cluster",
        "the broker's log is 0..",
        "archive.on-offset-reset",
        "next=20",
    ] {
        assert!(log.contains(want), "{want:?} missing from the log:\n{log}");
    }
    assert_eq!(archived, 60, "records archived although the policy is fail");
    drop(a);

    // `restart`: the new log from its beginning, every record exactly once,
    // the old files untouched, one reset counted per partition.
    let cfg_restart = config(tmp.path(), "on-offset-reset = \"restart\"");
    let a = Archiver::start(&dir, &broker.addr, "reset", &cfg_restart);
    let all = wait_complete(&[&dir], ledger.len());
    settle(&dir);
    assert_exactly_once(&all, &ledger);
    for p in 0..3 {
        let sample =
            format!("sluice_archive_offset_resets_total{{topic=\"events\",partition=\"{p}\"}}");
        assert_eq!(a.metric(&sample), 1, "{sample}\n{}", a.get("/metrics").1);
    }
    assert!(a.stop().success());

    // The checkpoint now names the new cluster: a restart is no reset.
    let a = Archiver::start(&dir, &broker.addr, "reset", &cfg_restart);
    produce(&broker.addr, "i1", 101, 15, &mut ledger);
    let all = wait_complete(&[&dir], ledger.len());
    assert_exactly_once(&all, &ledger);
    let sample = "sluice_archive_offset_resets_total{topic=\"events\",partition=\"0\"}";
    assert_eq!(a.metric(sample), 0, "{}", a.log_text());
    assert!(a.stop().success());
}

#[test]
fn a_group_whose_committed_offsets_cannot_be_read_is_retried_not_guessed() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let tmp = tempfile::tempdir().unwrap();
    // In this process, so that OffsetFetch can be made to fail while
    // Metadata, JoinGroup and Fetch keep working.
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let cfg = config(tmp.path(), "");
    let (d1, d2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    let mut ledger = Vec::new();
    let a1 = Archiver::start(&d1, &brokers, "handover", &cfg);
    produce(&brokers, "i3", 1, 60, &mut ledger);
    let all = wait_complete(&[&d1], ledger.len());
    assert_exactly_once(&all, &ledger);
    // A clean stop commits offsets 20 per partition to the group.
    assert!(a1.stop().success());
    // The next archiver of the group, in its own directory: its first
    // reads of the group's offsets fail.
    let failures = 3;
    cluster.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 3],
    );
    let a2 = Archiver::start(&d2, &brokers, "handover", &cfg);
    produce(&brokers, "i3", 61, 30, &mut ledger);
    wait_complete(&[&d1, &d2], ledger.len());
    settle(&d2);
    // Long enough for a guessed start (the beginning) to show as copies.
    std::thread::sleep(Duration::from_secs(3));
    let mut all = recount(&d1).0;
    for (k, v) in recount(&d2).0 {
        *all.entry(k).or_default() += v;
    }
    assert_exactly_once(&all, &ledger);
    assert_eq!(recount(&d2).0.len(), 30, "{}", a2.log_text());
    let retries = a2.metric("sluice_archive_assignment_retries_total");
    assert!(retries >= 1, "no retry counted:\n{}", a2.log_text());
    let log = a2.log_text();
    assert!(
        log.contains("cannot start the assigned partitions yet")
            && log.contains("committed offsets"),
        "{log}"
    );
    eprintln!("committed offsets: {failures} OffsetFetch failures injected, {retries} assignment retries, 0 duplicated");
    assert_eq!(a2.get("/ready").0, 200);
    assert!(a2.stop().success());
}

/// `sluice archive` with `[archive.librdkafka] key = value`; its exit status
/// and output, or None if it still runs after 60 s.
fn archive_with(tmp: &Path, brokers: &str, key: &str, value: &str) -> Option<(i32, String)> {
    let cfg = tmp.join("incremental.toml");
    std::fs::write(
        &cfg,
        format!("[archive]\ncommit-interval-ms = 150\n[archive.librdkafka]\n{key:?} = {value:?}\n"),
    )
    .unwrap();
    let log = tmp.join("incremental.log");
    let mut child = Command::new(EXE)
        .args(["archive", "--topic", TOPIC, "--listen", "127.0.0.1:0"])
        .args(["--brokers", brokers, "--group", "incremental", "--config"])
        .arg(&cfg)
        .arg("--dir")
        .arg(tmp.join("incremental"))
        .env("RUST_LOG", "sluice=info")
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(60));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
    eprintln!("{key} = {value}: {status:?}\n{out}");
    status.map(|s| (s.code().unwrap_or(-1), out))
}

#[test]
fn incremental_rebalancing_settings_are_refused_at_start_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path(), Some(3));
    let mut ledger = Vec::new();
    produce(&broker.addr, "i4", 1, 30, &mut ledger);
    for (key, value) in [
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("group.protocol", "consumer"),
    ] {
        let got = archive_with(tmp.path(), &broker.addr, key, value);
        let Some((code, out)) = got else {
            panic!("{key} = {value}: still running after 60 s");
        };
        assert_eq!(code, 2, "{key} = {value}: exit {code}\n{out}");
        assert!(
            out.contains(&format!("archive.librdkafka.{key}")) && out.contains("not supported")
                || out.contains("supports only"),
            "{key} = {value}:\n{out}"
        );
        // Nothing was archived, and check-config says the same.
        assert!(recount(&tmp.path().join("incremental")).0.is_empty());
        let check = Command::new(EXE)
            .args(["check-config", "--config"])
            .arg(tmp.path().join("incremental.toml"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&check.stdout).to_string()
            + &String::from_utf8_lossy(&check.stderr);
        assert!(!check.status.success() && text.contains(key), "{text}");
    }
}

#[test]
fn records_retention_deleted_before_they_were_archived_are_counted_not_silent() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path(), Some(3));
    let dir = tmp.path().join("archive");
    let cfg = config(tmp.path(), "");
    let mut ledger = Vec::new();
    let a = Archiver::start(&dir, &broker.addr, "gap", &cfg);
    produce(&broker.addr, "i5", 1, 30, &mut ledger);
    wait_complete(&[&dir], ledger.len());
    assert!(a.stop().success());
    // While the archiver is stopped, 120 records of 60 KiB on partition 0
    // (next offset 10): the dev broker keeps a partition's last 5 MiB, so
    // the oldest of them are gone before the archiver is back.
    let big = 120u64;
    let mut src = Source::new(&broker.addr, "i5");
    for seq in 31..31 + big {
        let value = serde_json::to_vec(&json!({"id": format!("i5-{seq}"),
            "timestamp": "2026-11-26T12:00:00Z", "tenant_id": "t0", "source": "web",
            "severity": "INFO", "pad": "x".repeat(60 << 10)}))
        .unwrap();
        src.send(seq, 0, &value);
    }
    src.flush();
    let a = Archiver::start(&dir, &broker.addr, "gap", &cfg);
    let sample = "sluice_archive_retention_skipped_total{topic=\"events\",partition=\"0\"}";
    let t0 = Instant::now();
    let (skipped, archived) = loop {
        let skipped = a.metric(sample);
        let archived = recount(&dir).0.len() as u64 - 30;
        if skipped > 0 && skipped + archived == big {
            break (skipped, archived);
        }
        assert!(
            t0.elapsed() < WITHIN,
            "{skipped} counted as deleted by retention, {archived} of {big} archived:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = a.log_text();
    assert!(
        log.contains(&format!("retention removed offsets 10..{}", 10 + skipped)),
        "{log}"
    );
    eprintln!(
        "retention gap: {skipped} offsets deleted before archiving, counted; {archived} archived"
    );
    assert!(a.stop().success());
}

/// A mock cluster in this process (owned by the returned producer), with
/// the test topic.
fn mock_cluster() -> (rdkafka::producer::BaseProducer, String) {
    let p: BaseProducer = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .create()
        .unwrap();
    let m = p.client().mock_cluster().unwrap();
    m.create_topic(TOPIC, 3, 1).unwrap();
    let bootstrap = m.bootstrap_servers();
    drop(m);
    (p, bootstrap)
}

/// Archives 60 records from cluster A, then makes A advertise its broker at
/// B's address, B holding `n_b` records; all must be archived once.
fn swap_clusters_while_archiving(n_b: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let (owner_a, brokers_a) = mock_cluster();
    let (_owner_b, brokers_b) = mock_cluster();
    let dir = tmp.path().join("archive");
    // Metadata refreshed every second: the swap is seen quickly.
    let cfg = tmp.path().join("swap.toml");
    std::fs::write(
        &cfg,
        "[archive]\ncommit-interval-ms = 150\non-offset-reset = \"restart\"\n\
         [archive.librdkafka]\n\"topic.metadata.refresh.interval.ms\" = \"1000\"\n",
    )
    .unwrap();
    let mut ledger = Vec::new();
    let mut a = Archiver::start(&dir, &brokers_a, "swap", &cfg);
    produce(&brokers_a, "i6", 1, 60, &mut ledger);
    let all = wait_complete(&[&dir], ledger.len());
    assert_exactly_once(&all, &ledger);
    produce(&brokers_b, "i6", 61, n_b, &mut ledger);
    // Cluster A now advertises its broker at B's address: what a DNS
    // failover looks like to a running client.
    let (host, port) = brokers_b.rsplit_once(':').unwrap();
    let host = std::ffi::CString::new(host).unwrap();
    // SAFETY: the mock cluster lives as long as `owner_a`, which outlives
    // the call; `host` is a valid C string for its duration.
    unsafe {
        let m = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner_a.client().native_ptr());
        assert!(!m.is_null());
        rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
            m,
            1,
            host.as_ptr(),
            port.parse().unwrap(),
        );
    }
    let all = wait_complete(&[&dir], ledger.len());
    settle(&dir);
    assert_exactly_once(&all, &ledger);
    assert!(
        a.wait_exit(Duration::from_millis(1)).is_none(),
        "{}",
        a.log_text()
    );
    let mut resets = 0;
    for p in 0..3 {
        resets += a.metric(&format!(
            "sluice_archive_offset_resets_total{{topic=\"events\",partition=\"{p}\"}}"
        ));
    }
    assert!(resets >= 3, "{resets} resets:\n{}", a.log_text());
    eprintln!(
        "cluster swap while archiving, {n_b} records on B: {resets} resets, {} archived once",
        ledger.len()
    );
    assert!(a.stop().success());
}

#[test]
fn a_cluster_swapped_behind_the_same_address_while_archiving_is_detected_and_restarted() {
    // B's log (10 per partition) ends below the position (20).
    swap_clusters_while_archiving(30);
}

#[test]
fn a_swapped_cluster_with_a_longer_log_is_detected_by_its_cluster_id() {
    // B's log (40 per partition) is longer than the position (20): only the
    // cluster id tells that offsets 0..20 are not the archived ones.
    swap_clusters_while_archiving(120);
}
