//! Named streams end to end, with real processes: the three former gateways'
//! own documented requests against one daemon running examples/migrate.toml,
//! each landing in its own topic only; the upgrade over a data dir written by
//! the version-1 build; and the refusal to start over records of a stream
//! the configuration no longer defines.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{get_json, http};
use crate::support::{wait_file, Serve, EXE};

/// A `sluice dev-broker` with the given topics, killed on drop.
struct TopicBroker {
    child: Child,
    addr: String,
}

impl TopicBroker {
    fn start(dir: &Path, topics: &[&str]) -> TopicBroker {
        let file = dir.join("broker");
        let mut cmd = Command::new(EXE);
        cmd.arg("dev-broker");
        for t in topics {
            cmd.args(["--topic", t]);
        }
        let child = cmd
            .arg("--addr-file")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = wait_file(&file);
        TopicBroker { child, addr }
    }
}

impl Drop for TopicBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture's bytes, exactly as the gateway's docs show the request body.
fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures/gateways").join(rel)).unwrap()
}

/// POST with extra headers; returns status and body.
fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Every record of `topic` (from the beginning), waiting up to a minute for
/// at least `at_least`.
fn records(brokers: &str, topic: &str, at_least: usize) -> Vec<sluice::dev::consume::Consumed> {
    let t0 = Instant::now();
    loop {
        let mut out = Vec::new();
        sluice::dev::consume::consume(brokers, topic, true, None, Duration::from_secs(2), |c| {
            out.push(c)
        })
        .unwrap();
        if out.len() >= at_least || t0.elapsed() > Duration::from_secs(60) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_committed(addr: &str, seq: u64) {
    let t0 = Instant::now();
    loop {
        let stats = get_json(addr, "/stats");
        if stats["replay"]["committed"].as_u64() >= Some(seq) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "{stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const MIGRATE_TOPICS: [&str; 8] = [
    "sluice-events",
    "sluice-events-dlq",
    "log-events",
    "log-events-dlq",
    "events",
    "events-dlq",
    "logs",
    "logs-dlq",
];

/// The Parsec sample payloads (its docs' "Valid Payloads" and "cURL
/// Examples"), the Go Event Ingestor's README request and the Log
/// Pipeline's README requests (JSON and CSV), each POSTed unchanged to one
/// daemon on examples/migrate.toml: every one is accepted whole, and every
/// event is in its stream's topic, once, and in no other topic.
#[test]
fn three_gateways_example_requests_unchanged_against_one_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TopicBroker::start(dir.path(), &MIGRATE_TOPICS);
    let d = Serve::new(&dir.path().join("data"))
        .arg("--config")
        .arg(repo().join("examples/migrate.toml"))
        .brokers(&broker.addr)
        .envs(&[("SLUICE_WAL_MIN_FREE_BYTES", "0")])
        .start();

    // Parsec: its curl examples send X-API-Key; sluice's auth is off here,
    // so the header is ignored, as an unknown header would be.
    let parsec = [
        "parsec/valid-1-single-log-info-level.json",
        "parsec/valid-2-single-log-error-level.json",
        "parsec/valid-3-single-log-critical-level.json",
        "parsec/valid-4-batch-logs-mixed-severity.json",
        "parsec/valid-5-e-commerce-workflow-batch.json",
        "parsec/valid-6-microservices-distributed-trace.json",
        "parsec/curl-valid-single-log.json",
        "parsec/curl-batch-logs.json",
    ];
    let mut expect_parsec = Vec::new();
    let mut last_seq = 0;
    for f in parsec {
        let body = fixture(f);
        let (status, resp) = post(
            &d.addr,
            "/ingest",
            &[
                ("Content-Type", "application/json"),
                ("X-API-Key", "test-api-key-123"),
            ],
            &body,
        );
        assert_eq!(status, 202, "{f}: {resp}");
        assert_eq!(resp["rejected"], 0, "{f}: {resp}");
        assert_eq!(resp["success"], true, "{f}: Parsec clients read `success`");
        last_seq = last_seq.max(resp["last_seq"].as_u64().unwrap());
        let sent: Value = serde_json::from_slice(&body).unwrap();
        let events = match sent {
            Value::Array(a) => a,
            one => vec![one],
        };
        for e in events {
            expect_parsec.push((
                e["id"].as_str().unwrap().to_string(),
                e["message"].as_str().unwrap().to_string(),
            ));
        }
    }

    let go = fixture("go-event-ingestor/readme-send-a-test-event.json");
    let (status, resp) = post(
        &d.addr,
        "/events",
        &[("Content-Type", "application/json")],
        &go,
    );
    assert_eq!(status, 202, "{resp}");
    assert_eq!(
        (resp["accepted"].as_u64(), resp["rejected"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(
        resp.get("success").is_none(),
        "only the parsec stream adds it"
    );
    last_seq = last_seq.max(resp["last_seq"].as_u64().unwrap());

    let mut expect_logs = Vec::new();
    for (f, ct) in [
        ("log-pipeline/readme-curl-json.json", "application/json"),
        (
            "log-pipeline/readme-example-json-batch.json",
            "application/json",
        ),
        ("log-pipeline/readme-curl-csv.csv", "text/csv"),
    ] {
        let body = fixture(f);
        let (status, resp) = post(&d.addr, "/logs", &[("Content-Type", ct)], &body);
        assert_eq!(status, 202, "{f}: {resp}");
        assert_eq!(resp["rejected"], 0, "{f}: {resp}");
        last_seq = last_seq.max(resp["last_seq"].as_u64().unwrap());
        let rows: Vec<(String, String, String)> = if ct == "text/csv" {
            let text = String::from_utf8(body).unwrap();
            text.lines()
                .skip(1)
                .map(|l| {
                    let c: Vec<&str> = l.split(',').collect();
                    (c[0].to_string(), c[1].to_string(), c[2].to_string())
                })
                .collect()
        } else {
            let v: Vec<Value> = serde_json::from_slice(&body).unwrap();
            v.iter()
                .map(|e| {
                    (
                        e["timestamp"].as_str().unwrap().to_string(),
                        e["path"].as_str().unwrap().to_string(),
                        e["userAgent"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        expect_logs.extend(rows);
    }
    wait_committed(&d.addr, last_seq);

    // Parsec -> log-events, with sluice's own schema and key.
    let got = records(&broker.addr, "log-events", expect_parsec.len());
    let mut got_parsec: Vec<(String, String)> = got
        .iter()
        .map(|c| {
            assert_eq!(
                c.key.as_deref(),
                c.value["tenant_id"].as_str(),
                "keyed by tenant"
            );
            (
                c.value["id"].as_str().unwrap().to_string(),
                c.value["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got_parsec.sort();
    expect_parsec.sort();
    assert_eq!(
        got_parsec, expect_parsec,
        "every Parsec event once in log-events"
    );

    // Go Event Ingestor -> events, its fields kept verbatim.
    let got = records(&broker.addr, "events", 1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].value["type"], "click");
    assert_eq!(got[0].value["payload"], serde_json::json!({"user_id": 123}));
    assert_eq!(got[0].key.as_deref(), Some("click"), "keyed by type");

    // Log Pipeline -> logs, JSON and CSV alike.
    let got = records(&broker.addr, "logs", expect_logs.len());
    let mut got_logs: Vec<(String, String, String)> = got
        .iter()
        .map(|c| {
            (
                c.value["timestamp"].as_str().unwrap().to_string(),
                c.value["path"].as_str().unwrap().to_string(),
                c.value["userAgent"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // sluice writes timestamps as RFC 3339 in UTC; these are already.
    got_logs.sort();
    expect_logs.sort();
    assert_eq!(
        got_logs, expect_logs,
        "every Log Pipeline event once in logs"
    );

    // Nowhere else: the default stream's topic and every dead-letter topic
    // stayed empty.
    for t in [
        "sluice-events",
        "sluice-events-dlq",
        "log-events-dlq",
        "events-dlq",
        "logs-dlq",
    ] {
        let got = records(&broker.addr, t, 0);
        assert!(got.is_empty(), "{t} holds {got:?}");
    }

    // /stats and /metrics say the same per stream.
    let stats = get_json(&d.addr, "/stats");
    assert_eq!(
        stats["streams"]["parsec"]["events_accepted"].as_u64(),
        Some(expect_parsec.len() as u64),
        "{stats}"
    );
    assert_eq!(stats["streams"]["go-ingestor"]["events_accepted"], 1);
    assert_eq!(
        stats["streams"]["log-pipeline"]["events_accepted"].as_u64(),
        Some(expect_logs.len() as u64)
    );
    assert_eq!(
        stats["streams"]["default"]["routes"],
        serde_json::json!(["/v1/events", "/v1/logs"])
    );
    let metrics = http(&d.addr, "GET", "/metrics", "text/plain", b"").1;
    assert!(
        metrics
            .contains(r#"sluice_stream_events_total{outcome="accepted",stream="go-ingestor"} 1"#),
        "{metrics}"
    );
}

/// Copies a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The data dir the version-1 build left after SIGKILL (six acknowledged,
/// undelivered events; tests/fixtures/wal-v1/README.md): this build, with a
/// stream of its own besides the default, delivers all six to the default
/// stream's topic, exactly once, none to the other stream, keeps answering
/// the stored Idempotency-Key as a replay, and appends version-2 records
/// after them.
#[test]
fn upgrade_over_a_version_1_data_dir_delivers_every_event_to_the_default_topic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(&repo().join("tests/fixtures/wal-v1/data"), &data);
    let head = std::fs::read(data.join("wal/00000000000000000001.wal")).unwrap();
    assert_eq!(
        &head[8..12],
        &1u32.to_le_bytes(),
        "the fixture is version 1"
    );
    let broker = TopicBroker::start(dir.path(), &["events", "events-dlq", "other", "other-dlq"]);
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "[[streams]]\nname = \"other\"\nroutes = [\"/other\"]\ntopic = \"other\"\ndead-letter-topic = \"other-dlq\"\n",
    )
    .unwrap();
    let d = Serve::new(&data)
        .arg("--config")
        .arg(&config)
        .brokers(&broker.addr)
        // The fixture's key was stored on the day the fixture was made; a
        // window of a century keeps the retry inside it whatever today's
        // date is (the default 24 h made this test fail a day later).
        .envs(&[
            ("SLUICE_WAL_MIN_FREE_BYTES", "0"),
            ("SLUICE_IDEMPOTENCY_WINDOW_SECS", "3153600000"),
        ])
        .start();
    wait_committed(&d.addr, 6);
    let got = records(&broker.addr, "events", 6);
    let mut by_seq: BTreeMap<u64, (String, String)> = BTreeMap::new();
    for c in &got {
        let seq: u64 = c.header("seq").unwrap().parse().unwrap();
        let prev = by_seq.insert(
            seq,
            (
                c.header("id").unwrap().to_string(),
                c.value["tenant_id"].as_str().unwrap().to_string(),
            ),
        );
        assert!(prev.is_none(), "seq {seq} delivered twice");
    }
    let want: BTreeMap<u64, (String, String)> = [
        (1, "fx-1", "acme"),
        (2, "fx-2", "acme"),
        (3, "fx-3", "globex"),
        (4, "fx-4", "acme"),
        (5, "fx-5", "globex"),
        (6, "fx-6", "acme"),
    ]
    .into_iter()
    .map(|(s, i, t)| (s, (i.to_string(), t.to_string())))
    .collect();
    assert_eq!(by_seq, want);
    assert!(records(&broker.addr, "other", 0).is_empty());
    assert!(records(&broker.addr, "events-dlq", 0).is_empty());
    // The key stored by the old build still answers its retry, unchanged.
    let (status, resp) = post(
        &d.addr,
        "/v1/events",
        &[
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "\"fx-idem-1\""),
        ],
        br#"{"tenant_id":"globex","source":"billing","message":"idempotent","id":"fx-5"}"#,
    );
    assert_eq!(status, 202, "{resp}");
    assert_eq!(
        resp["first_seq"], 5,
        "a replay of the stored answer: {resp}"
    );
    // New records follow in version 2, on both streams.
    let (status, resp) = post(
        &d.addr,
        "/other",
        &[("Content-Type", "application/json")],
        br#"{"tenant_id":"acme","source":"s","message":"after upgrade","id":"new-1"}"#,
    );
    assert_eq!(status, 202, "{resp}");
    assert_eq!(resp["first_seq"], 7);
    // In a segment of its own, of version 2: a version-1 segment is never
    // appended to.
    let seg = std::fs::read(data.join("wal/00000000000000000007.wal")).unwrap();
    assert_eq!(&seg[8..12], &2u32.to_le_bytes());
    wait_committed(&d.addr, 7);
    let got = records(&broker.addr, "other", 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("id"), Some("new-1"));
    assert_eq!(
        records(&broker.addr, "events", 6).len(),
        6,
        "nothing new in events"
    );
}

/// Records of a stream that the configuration no longer defines: serve
/// refuses to start and names the stream and its sequence range, so the
/// events are neither dropped nor produced to another stream's topic; with
/// the stream back, they are delivered to its topic, and once delivered the
/// stream can be removed.
#[test]
fn serve_refuses_a_wal_holding_an_unconfigured_stream_then_delivers_it_when_restored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let with_stream = dir.path().join("with.toml");
    std::fs::write(
        &with_stream,
        "[[streams]]\nname = \"audit\"\nroutes = [\"/audit\"]\ntopic = \"audit\"\ndead-letter-topic = \"audit-dlq\"\n",
    )
    .unwrap();
    // Kafka unreachable: the events stay in the WAL.
    let d = Serve::new(&data)
        .arg("--config")
        .arg(&with_stream)
        .brokers("127.0.0.1:1")
        .envs(&[("SLUICE_WAL_MIN_FREE_BYTES", "0")])
        .start();
    let (status, resp) = post(
        &d.addr,
        "/audit",
        &[("Content-Type", "application/json")],
        br#"[{"tenant_id":"a","source":"s","message":"one","id":"au-1"},{"tenant_id":"a","source":"s","message":"two","id":"au-2"}]"#,
    );
    assert_eq!(status, 202, "{resp}");
    drop(d); // SIGKILL

    let log = dir.path().join("refused.log");
    let out = Command::new(EXE)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--brokers",
            "127.0.0.1:1",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("SLUICE_HTTP_ADMIN_LISTEN", "")
        .env("SLUICE_WAL_MIN_FREE_BYTES", "0")
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    // A start-up refusal is exit 2, as every configuration error (the docs
    // said 1 while the code said 2).
    assert_eq!(out.code(), Some(2), "serve must refuse");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("\"audit\" (2 records, seqs 1..=2)") && text.contains("Refusing to start"),
        "{text}"
    );

    let broker = TopicBroker::start(dir.path(), &["events", "events-dlq", "audit", "audit-dlq"]);
    let d = Serve::new(&data)
        .arg("--config")
        .arg(&with_stream)
        .brokers(&broker.addr)
        .envs(&[("SLUICE_WAL_MIN_FREE_BYTES", "0")])
        .start();
    wait_committed(&d.addr, 2);
    let ids: Vec<String> = records(&broker.addr, "audit", 2)
        .iter()
        .map(|c| c.header("id").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"au-1".to_string()) && ids.contains(&"au-2".to_string()));
    assert!(records(&broker.addr, "events", 0).is_empty());
    // Delivered: now the stream can go.
    drop(d);
    let d = Serve::new(&data)
        .brokers(&broker.addr)
        .envs(&[("SLUICE_WAL_MIN_FREE_BYTES", "0")])
        .start();
    let (status, _) = post(
        &d.addr,
        "/v1/events",
        &[("Content-Type", "application/json")],
        br#"{"tenant_id":"a","source":"s","message":"m"}"#,
    );
    assert_eq!(status, 202);
}
