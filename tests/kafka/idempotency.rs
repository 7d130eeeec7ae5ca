//! `Idempotency-Key` against a real `sluice serve` and `sluice dev-broker`:
//! replay after kill -9, 422 on another body, 409 while the first request is
//! in flight, scope per API key, eviction, and survival across GC and a
//! restart. Also the `instance` header every record carries.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice::auth::keys::{append_entry, hash_key};

use super::daemon::{get_json, serve, wait_committed, Broker, Daemon};

/// A POST to `path` with `headers`; returns status, lower-cased headers
/// and the body's bytes exactly as sent.
fn exchange(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(resp[..split].to_vec()).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    (status, headers, resp[split + 4..].to_vec())
}

/// A JSON POST to `/v1/events` with extra headers; returns status,
/// lower-cased headers, body.
fn post(
    addr: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    let (status, headers, body) = exchange(addr, "/v1/events", &all, body.as_bytes());
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn events(prefix: &str, n: usize) -> String {
    let v: Vec<_> = (0..n)
        .map(|i| serde_json::json!({"id": format!("{prefix}-{i}"), "tenant_id": "t", "source": "test", "message": "m"}))
        .collect();
    serde_json::to_string(&v).unwrap()
}

fn seqs(v: &serde_json::Value) -> (u64, u64) {
    (
        v["first_seq"].as_u64().unwrap(),
        v["last_seq"].as_u64().unwrap(),
    )
}

fn kill9(d: Daemon) {
    let pid = std::fs::read_to_string(d.data.join("LOCK")).unwrap();
    Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    drop(d);
}

fn next_seq(d: &Daemon) -> u64 {
    get_json(&d.addr, "/stats")["wal"]["next_seq"]
        .as_u64()
        .unwrap()
}

fn labeled_metric(addr: &str, sample: &str) -> f64 {
    super::daemon::get(addr, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Enough unkeyed traffic (ids `prefix`N-i) for several 4 KiB segments,
/// delivered, then waits until GC has removed every segment holding a seq
/// up to `seq` (so its keys are only in sled).
fn collect_through(d: &Daemon, prefix: &str, seq: u64) {
    let mut last = 0;
    for i in 0..20 {
        last = super::daemon::post_events(&d.addr, &format!("{prefix}{i}"), 0..10);
    }
    wait_committed(d, last);
    let t0 = Instant::now();
    while get_json(&d.addr, "/stats")["wal"]["first_seq"]
        .as_u64()
        .unwrap_or(0)
        <= seq
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "segment never collected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn setup() -> (tempfile::TempDir, Broker, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), Some(1));
    let data = dir.path().join("data");
    (dir, broker, data)
}

#[test]
fn a_retry_after_kill_9_gets_the_first_answer_and_nothing_is_appended() {
    let (_dir, broker, data) = setup();
    let d = serve(&data, &broker.addr, &[], &[]);
    let body = events("a", 3);
    let key = [("Idempotency-Key", "\"order-1\"")];
    let (status, h, first) = post(&d.addr, &key, &body);
    assert_eq!(status, 202, "{first}");
    assert_eq!(header(&h, "idempotent-replayed"), None);
    let range = seqs(&first);
    let instance = get_json(&d.addr, "/stats")["instance"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(instance.len(), 36);
    kill9(d);

    let d = serve(&data, &broker.addr, &[], &[]);
    assert_eq!(
        get_json(&d.addr, "/stats")["instance"],
        instance.as_str(),
        "stable across restarts"
    );
    let before = next_seq(&d);
    let (status, h, again) = post(&d.addr, &key, &body);
    assert_eq!(status, 202, "{again}");
    assert_eq!(header(&h, "idempotent-replayed"), Some("true"));
    assert_eq!(again, first, "the same body, sequence numbers included");
    assert_eq!(seqs(&again), range);
    assert_eq!(next_seq(&d), before, "nothing appended");
    wait_committed(&d, range.1);
    // Every record carries the instance next to seq, and the internal
    // idempotency entry never reaches Kafka.
    let mut seen = 0;
    sluice::dev::consume::consume(
        &broker.addr,
        "events",
        true,
        None,
        Duration::from_secs(3),
        |c| {
            assert_eq!(c.header("instance"), Some(instance.as_str()));
            assert!(c.header(":sluice.idempotency").is_none());
            seen += 1;
        },
    )
    .unwrap();
    assert!(seen >= 3);
}

#[test]
fn another_body_gets_422_a_concurrent_request_409_and_a_rejected_batch_stores_nothing() {
    let (_dir, broker, data) = setup();
    // Every group commit waits 1.5 s before its fdatasync, so the first
    // request is still in flight when the second arrives.
    let d = serve(
        &data,
        &broker.addr,
        &[("SLUICE_DEBUG_PAUSE", "commit=1500")],
        &[],
    );
    let body = events("b", 2);
    let addr = d.addr.clone();
    let b2 = body.clone();
    let first = std::thread::spawn(move || post(&addr, &[("Idempotency-Key", "k")], &b2));
    // Whichever of the two reaches the index second meets the other in
    // flight (its commit is held 1.5 s): exactly one 202 and one 409.
    std::thread::sleep(Duration::from_millis(300));
    let second = post(&d.addr, &[("Idempotency-Key", "k")], &body);
    let first = first.join().unwrap();
    let (original, (h, v)) = match (first, second) {
        ((202, _, o), (409, h, v)) | ((409, h, v), (202, _, o)) => (o, (h, v)),
        (a, b) => panic!("expected one 202 and one 409: {a:?} {b:?}"),
    };
    assert_eq!(header(&h, "retry-after"), Some("1"), "{v}");
    let (status, h, replay) = post(&d.addr, &[("Idempotency-Key", "k")], &body);
    assert_eq!(
        (status, header(&h, "idempotent-replayed")),
        (202, Some("true"))
    );
    assert_eq!(replay, original);

    let (status, _, v) = post(&d.addr, &[("Idempotency-Key", "k")], &events("other", 2));
    assert_eq!(status, 422, "{v}");

    // All events rejected: 400, nothing stored, so the retry is validated
    // again (400 again, not a replay).
    let bad = r#"[{"tenant_id": "bad tenant", "source": "s", "message": "m"}]"#;
    for _ in 0..2 {
        let (status, h, _) = post(&d.addr, &[("Idempotency-Key", "bad")], bad);
        assert_eq!((status, header(&h, "idempotent-replayed")), (400, None));
    }
    let (status, _, v) = post(
        &d.addr,
        &[("Idempotency-Key", "bad")],
        &events("now-good", 1),
    );
    assert_eq!(status, 202, "{v}");
    let (status, _, v) = post(&d.addr, &[("Idempotency-Key", "a b")], &body);
    assert_eq!(status, 400, "{v}");
}

#[test]
fn keys_are_scoped_to_the_api_key() {
    let (dir, broker, data) = setup();
    let keys = dir.path().join("keys.toml");
    let mut t = append_entry("", "alice", &hash_key("sluice_alice"), &["t".into()]);
    t = append_entry(&t, "bob", &hash_key("sluice_bob"), &["t".into()]);
    std::fs::write(&keys, t).unwrap();
    let d = serve(
        &data,
        &broker.addr,
        &[("SLUICE_AUTH_KEYS_FILE", keys.to_str().unwrap())],
        &[],
    );
    let alice = [
        ("Authorization", "Bearer sluice_alice"),
        ("Idempotency-Key", "same"),
    ];
    let bob = [
        ("Authorization", "Bearer sluice_bob"),
        ("Idempotency-Key", "same"),
    ];
    let (status, _, a) = post(&d.addr, &alice, &events("alice", 1));
    assert_eq!(status, 202, "{a}");
    // Bob's request with Alice's key is his own: appended, not a 422 and
    // not Alice's answer.
    let (status, h, b) = post(&d.addr, &bob, &events("bob", 1));
    assert_eq!(
        (status, header(&h, "idempotent-replayed")),
        (202, None),
        "{b}"
    );
    assert_ne!(seqs(&a), seqs(&b));
    let (status, h, _) = post(&d.addr, &alice, &events("alice", 1));
    assert_eq!(
        (status, header(&h, "idempotent-replayed")),
        (202, Some("true"))
    );
}

#[test]
fn the_oldest_key_is_evicted_over_the_cap() {
    let (_dir, broker, data) = setup();
    let d = serve(
        &data,
        &broker.addr,
        &[("SLUICE_IDEMPOTENCY_MAX_KEYS", "2")],
        &[],
    );
    let mut ranges = Vec::new();
    for k in ["k1", "k2", "k3"] {
        let (status, _, v) = post(&d.addr, &[("Idempotency-Key", k)], &events(k, 1));
        assert_eq!(status, 202);
        ranges.push(seqs(&v));
    }
    assert_eq!(get_json(&d.addr, "/stats")["idempotency"]["keys_held"], 2);
    assert_eq!(
        labeled_metric(
            &d.addr,
            "sluice_idempotency_keys_evicted_total{reason=\"cap\"}"
        ),
        1.0
    );
    // k3 is remembered, k1 was forgotten: appended again, with new numbers.
    let (_, h, v) = post(&d.addr, &[("Idempotency-Key", "k3")], &events("k3", 1));
    assert_eq!(
        (header(&h, "idempotent-replayed"), seqs(&v)),
        (Some("true"), ranges[2])
    );
    let (status, h, v) = post(&d.addr, &[("Idempotency-Key", "k1")], &events("k1", 1));
    assert_eq!((status, header(&h, "idempotent-replayed")), (202, None));
    assert!(seqs(&v).0 > ranges[2].1);
}

#[test]
fn a_key_outlives_the_gc_of_its_segment_and_a_restart() {
    let (_dir, broker, data) = setup();
    let d = serve(&data, &broker.addr, &[], &[]);
    let body = events("gc", 5);
    let (status, _, first) = post(&d.addr, &[("Idempotency-Key", "survivor")], &body);
    assert_eq!(status, 202);
    let range = seqs(&first);
    collect_through(&d, "fill", range.1);
    kill9(d);
    let d = serve(&data, &broker.addr, &[], &[]);
    let (status, h, again) = post(&d.addr, &[("Idempotency-Key", "survivor")], &body);
    assert_eq!(
        (status, header(&h, "idempotent-replayed")),
        (202, Some("true")),
        "{}",
        d.log_text()
    );
    assert_eq!(again, first);
    assert!(d.log_text().contains("idempotency keys rebuilt"));
}

/// One keyed request of the byte-for-byte test: path, Content-Type, key,
/// body.
type Keyed = (&'static str, &'static str, &'static str, Vec<u8>);

/// Keyed requests on every protocol, each with a rejected item so the
/// answer carries its error text: an events batch, and the same OTLP
/// request as protobuf and as OTLP/JSON.
fn keyed_requests() -> Vec<Keyed> {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    let s = |v: &str| {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        })
    };
    let kv = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: s(v),
    };
    let record = |body: Option<AnyValue>| LogRecord {
        severity_number: 13,
        body,
        ..Default::default()
    };
    let otlp = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "checkout"), kv("tenant.id", "t")],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: vec![record(s("a")), record(None), record(s("b"))],
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    };
    let events = r#"[{"id":"bb-1","tenant_id":"t","source":"test","message":"m"},{"id":"bb-2","tenant_id":"t","message":"no source"}]"#;
    vec![
        (
            "/v1/events",
            "application/json",
            "bb-events",
            events.as_bytes().to_vec(),
        ),
        (
            "/v1/logs",
            "application/x-protobuf",
            "bb-protobuf",
            prost::Message::encode_to_vec(&otlp),
        ),
        (
            "/v1/logs",
            "application/json",
            "bb-json",
            serde_json::to_vec(&otlp).unwrap(),
        ),
    ]
}

type Answer = (u16, Option<String>, Vec<u8>);

fn send_keyed(addr: &str, (path, ct, key, body): &Keyed) -> (Answer, Option<String>) {
    let (status, h, body) = exchange(
        addr,
        path,
        &[("Content-Type", ct), ("Idempotency-Key", key)],
        body,
    );
    let ct = header(&h, "content-type").map(str::to_string);
    (
        (status, ct, body),
        header(&h, "idempotent-replayed").map(str::to_string),
    )
}

/// Every key replays its first answer exactly, appends nothing, and is
/// refused (422) on the other protocols.
fn check_replays(d: &Daemon, requests: &[Keyed], firsts: &[Answer], when: &str) {
    let before = next_seq(d);
    for (req, first) in requests.iter().zip(firsts) {
        let (again, replayed) = send_keyed(&d.addr, req);
        assert_eq!(replayed.as_deref(), Some("true"), "{when}: {}", req.2);
        assert_eq!(
            (again.0, &again.1, String::from_utf8_lossy(&again.2)),
            (first.0, &first.1, String::from_utf8_lossy(&first.2)),
            "{when}: {} replays its first answer byte for byte",
            req.2
        );
        for other in requests.iter().filter(|o| (o.0, o.1) != (req.0, req.1)) {
            let cross = (other.0, other.1, req.2, req.3.clone());
            let ((status, _, body), replayed) = send_keyed(&d.addr, &cross);
            assert_eq!(
                (status, replayed),
                (422, None),
                "{when}: {} reused on {} {}: {}",
                req.2,
                other.0,
                other.1,
                String::from_utf8_lossy(&body)
            );
        }
    }
    assert_eq!(next_seq(d), before, "{when}: nothing appended");
}

#[test]
fn replays_are_the_first_answer_byte_for_byte_across_kill_9_and_gc() {
    let (_dir, broker, data) = setup();
    // No reachable broker first: nothing commits, so after the kill the
    // keys come back from the WAL alone.
    let d = serve(&data, "127.0.0.1:1", &[], &[]);
    let requests = keyed_requests();
    let mut firsts = Vec::new();
    for r in &requests {
        let (first, replayed) = send_keyed(&d.addr, r);
        assert!(
            matches!(first.0, 200 | 202),
            "{}: {}",
            r.2,
            String::from_utf8_lossy(&first.2)
        );
        assert_eq!(replayed, None);
        firsts.push(first);
    }
    let last_keyed = next_seq(&d) - 1;
    check_replays(&d, &requests, &firsts, "same process");
    kill9(d);

    let d = serve(&data, "127.0.0.1:1", &[], &[]);
    check_replays(&d, &requests, &firsts, "after kill -9, from the WAL");
    kill9(d);

    // Now deliver: commits checkpoint the keys into sled, and GC removes
    // the segments that carried them.
    let d = serve(&data, &broker.addr, &[], &[]);
    collect_through(&d, "bb-fill", last_keyed);
    check_replays(&d, &requests, &firsts, "after the checkpoint and GC");
    kill9(d);
    let d = serve(&data, &broker.addr, &[], &[]);
    check_replays(&d, &requests, &firsts, "after GC and kill -9, from sled");
}

/// The version-1 data dir (tests/fixtures/wal-v1: its key `fx-idem-1` was
/// stored by the old build in a version-1 entry, seq 5): this build
/// answers its retry with the old build's answer byte for byte, and
/// refuses the key on `/v1/logs`. The window is widened: the fixture's key
/// is older than a day.
#[test]
fn a_version_1_entry_replays_the_old_builds_answer_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wal-v1/data");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&fixture)
        .arg(&data)
        .status()
        .unwrap()
        .success());
    let d = serve(
        &data,
        "127.0.0.1:1",
        &[("SLUICE_IDEMPOTENCY_WINDOW_SECS", "315360000")],
        &[],
    );
    let body = br#"{"tenant_id":"globex","source":"billing","message":"idempotent","id":"fx-5"}"#;
    let key = [
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "\"fx-idem-1\""),
    ];
    let (status, h, got) = exchange(&d.addr, "/v1/events", &key, body);
    assert_eq!(
        (
            status,
            header(&h, "content-type"),
            header(&h, "idempotent-replayed")
        ),
        (202, Some("application/json"), Some("true")),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        r#"{"accepted":1,"rejected":0,"errors":[],"first_seq":5,"last_seq":5}"#
    );
    let (status, _, got) = exchange(&d.addr, "/v1/logs", &key, body);
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&got));
    assert_eq!(next_seq(&d), 7, "nothing appended");
}

/// The retry of `key` gets `first` back, marked replayed.
fn assert_replayed(d: &Daemon, key: &[(&str, &str)], body: &str, first: &serde_json::Value) {
    let (status, h, again) = post(&d.addr, key, body);
    assert_eq!(
        (status, header(&h, "idempotent-replayed")),
        (202, Some("true")),
        "{again}\n{}",
        d.log_text()
    );
    assert_eq!(&again, first);
}

/// Hostile review of the idempotency log (D2, D3): a log that lost its
/// checkpoints, or one left behind by a WAL that started over, must not
/// hide the keys whose records the WAL still holds. An intact log is never
/// behind the committed offset (every commit checkpoints first), and never
/// at or past the WAL's end; otherwise the rebuild rescans the whole WAL.
#[test]
fn a_log_that_lost_checkpoints_or_outlived_its_wal_hides_no_key() {
    let (_dir, broker, data) = setup();
    let d = serve(&data, &broker.addr, &[], &[]);
    let body = events("lost", 2);
    let key = [("Idempotency-Key", "kept-in-wal")];
    let (status, _, first) = post(&d.addr, &key, &body);
    assert_eq!(status, 202, "{first}");
    wait_committed(&d, seqs(&first).1);
    assert!(d.stop().success());
    // The log cut back to its magic: a valid, empty log whose watermark
    // (0) is below the committed offset. The key's record is still in the
    // WAL's active segment.
    let log = data.join("idempotency.log");
    let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(16).unwrap();
    drop(f);
    let d = serve(&data, &broker.addr, &[], &[]);
    assert_replayed(&d, &key, &body, &first);
    assert!(d.log_text().contains("idempotency log not trusted"));
    // Many keyed requests, so that the log's watermark is far ahead of
    // what a new WAL will hold; then the WAL and the offsets start over
    // (an operator removed them), the log stays.
    for i in 0..30 {
        let k = format!("filler-{i}");
        let (status, _, _) = post(&d.addr, &[("Idempotency-Key", &k)], &events(&k, 5));
        assert_eq!(status, 202);
    }
    let last = next_seq(&d) - 1;
    wait_committed(&d, last);
    assert!(d.stop().success());
    std::fs::remove_dir_all(data.join("wal")).unwrap();
    std::fs::remove_dir_all(data.join("offsets")).unwrap();
    let d = serve(&data, &broker.addr, &[], &[]);
    let key = [("Idempotency-Key", "after-the-wal-restarted")];
    let body = events("restarted", 2);
    let (status, _, first) = post(&d.addr, &key, &body);
    assert_eq!(status, 202, "{first}");
    assert!(seqs(&first).1 < last, "seqs are reused: {first}");
    // Killed before a periodic checkpoint can have written the key: only
    // the rescan can find it.
    kill9(d);
    let d = serve(&data, &broker.addr, &[], &[]);
    assert_replayed(&d, &key, &body, &first);
}

/// A power cut before a group commit's fdatasync can keep a keyed batch's
/// first record, which carries the key, and lose later ones: the tail cut
/// at open, or a hole that recovery reports lost. That batch never got its
/// 202, so a retry must append it again; a replayed answer would
/// acknowledge records that are gone, under sequence numbers that are lost
/// or handed out again. Found by the power-cut harness (`make powercut`,
/// serve and files modes, a torn cut): a replayed 202 covered 30 records of
/// a range recovery had reported lost.
#[test]
fn a_retry_of_a_keyed_batch_torn_before_its_fdatasync_appends_it_again() {
    use std::os::unix::fs::FileExt;
    for hole in [false, true] {
        let (_dir, broker, data) = setup();
        let big_segments = ("SLUICE_WAL_SEGMENT_BYTES", "1048576");
        // On a fresh data dir the first fdatasync is the first segment's
        // header; the second, the batch's group commit, fails: its frames
        // are written, never acknowledged, and the daemon exits.
        let mut d = serve(
            &data,
            &broker.addr,
            &[("SLUICE_DEBUG_FAIL_FSYNC_AFTER", "1"), big_segments],
            &[],
        );
        let body = events("torn", 20);
        let key = [("Idempotency-Key", "\"torn-batch\"")];
        let (status, _, v) = post(&d.addr, &key, &body);
        assert_eq!(status, 503, "{v}");
        assert!(d.wait_exit(Duration::from_secs(60)).is_some());
        drop(d);
        // What the power cut left of the unsynced frames: the first third,
        // then (hole) zeros where the disk wrote nothing, then the rest.
        let seg = data.join("wal").join(sluice::wal::format::segment_name(1));
        let len = std::fs::metadata(&seg).unwrap().len();
        let head = sluice::wal::format::HEADER_LEN as u64;
        let frames = len - head;
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        if hole {
            f.write_all_at(&vec![0u8; frames as usize / 4], head + frames / 3)
                .unwrap();
        } else {
            f.set_len(head + frames / 3).unwrap();
        }
        drop(f);

        let d = serve(&data, &broker.addr, &[big_segments], &[]);
        let (status, h, v) = post(&d.addr, &key, &body);
        assert_eq!(
            (status, header(&h, "idempotent-replayed")),
            (202, None),
            "hole {hole}: appended again, not replayed: {v}"
        );
        assert_eq!(v["accepted"], 20, "{v}");
        let (first, last) = seqs(&v);
        wait_committed(&d, last);
        for seq in first..=last {
            let r = get_json(&d.addr, &format!("/v1/receipts/{seq}"));
            assert_eq!(r["status"], "delivered", "hole {hole}: {r}");
        }
        assert_eq!(
            labeled_metric(
                &d.addr,
                "sluice_idempotency_keys_evicted_total{reason=\"torn\"}"
            ),
            1.0,
            "hole {hole}"
        );
        // The key now stands for the new batch.
        let (status, h, again) = post(&d.addr, &key, &body);
        assert_eq!(
            (status, header(&h, "idempotent-replayed")),
            (202, Some("true"))
        );
        assert_eq!(again, v);
    }
}
