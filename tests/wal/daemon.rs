//! The WAL seen through a real `sluice serve` process: a failure that no
//! request waits for still ends the daemon (and fails /health and the
//! watchdog), and a damaged frame length in the last segment is counted
//! exactly by a restarted daemon. Kafka is unreachable on purpose: these
//! records stay in the WAL.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sluice::config::Config;
use sluice::http::{app, AppState};
use sluice::replay::offsets::OffsetStore;
use sluice::wal::format;
use sluice::wal::io::{Fault, FaultKind, Filesystem, SimFs};
use sluice::wal::Wal;
use tower::ServiceExt;

use crate::support::{Daemon, Serve, EXE};

fn daemon(data: &Path, env: &[(&str, &str)], log: &Path) -> (Daemon, String) {
    let d = Serve::new(data)
        .brokers("127.0.0.1:1")
        .envs(&[
            ("SLUICE_REPLAY_DRAIN_TIMEOUT_MS", "300"),
            ("SLUICE_WAL_MIN_FREE_BYTES", "0"),
            ("SLUICE_LOG_FORMAT", "json"),
        ])
        .envs(env)
        .log(log)
        .start();
    let addr = d.addr.clone();
    (d, addr)
}

/// One HTTP/1.1 exchange; (status, body). Status 0 when the connection failed.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() || resp.len() < 12 {
        return (0, resp);
    }
    let status = resp[9..12].parse().unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

fn event(id: &str) -> String {
    format!(r#"{{"id":"{id}","tenant_id":"t","source":"s","message":"m-{id}"}}"#)
}

/// Reads `$NOTIFY_SOCKET` datagrams as systemd does, continuously: a full
/// datagram queue would block the daemon's sd_notify calls.
fn collect_notifications(sock: UnixDatagram) -> Arc<std::sync::Mutex<Vec<String>>> {
    let out = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            sink.lock().unwrap().extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(|l| l.trim().to_string()),
            );
        }
    });
    out
}

/// A debug build pauses 3 s between the write and the fdatasync, the
/// fdatasync fails, and the request deadline is 1 s: the request has left
/// with its 503 before the failure happens. The daemon must still stop
/// pinging the watchdog, say STOPPING and exit non-zero on its own.
#[test]
fn a_wal_failure_that_no_request_waits_for_ends_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let notify = dir.path().join("notify");
    let notes = collect_notifications(UnixDatagram::bind(&notify).unwrap());
    let log = dir.path().join("log");
    let (mut d, addr) = daemon(
        &data,
        &[
            ("SLUICE_DEBUG_PAUSE", "commit=3000"),
            // On a fresh directory the only fdatasync before the first
            // commit is the first segment's header.
            ("SLUICE_DEBUG_FAIL_FSYNC_AFTER", "1"),
            ("SLUICE_HTTP_REQUEST_TIMEOUT_MS", "1000"),
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &log,
    );
    assert_eq!(http(&addr, "GET", "/health", "").0, 200);
    let (status, body) = http(&addr, "POST", "/v1/events", &event("a"));
    assert_eq!(status, 503, "the deadline passed before the fsync: {body}");
    let exit = d.wait_exit(Duration::from_secs(60));
    if exit.is_none() {
        let _ = d.child.kill();
        let _ = d.child.wait();
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("WAL failed; refusing all further appends"),
        "{log}"
    );
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(1),
        "the daemon ended by itself, non-zero, so systemd restarts it: {log}"
    );
    let msgs = notes.lock().unwrap().clone();
    assert!(msgs.iter().any(|m| m == "READY=1"), "{msgs:?}");
    assert!(msgs.iter().any(|m| m == "WATCHDOG=1"), "{msgs:?}");
    let stopping = msgs
        .iter()
        .position(|m| m == "STOPPING=1")
        .unwrap_or_else(|| panic!("STOPPING=1 sent: {msgs:?}"));
    assert!(
        !msgs[stopping..].iter().any(|m| m == "WATCHDOG=1"),
        "no pings after the failure: {msgs:?}"
    );

    // Restart without the fault: recovery keeps nothing unacknowledged that
    // was not on disk, and ingest works.
    let (mut d, addr) = daemon(&data, &[], &dir.path().join("log2"));
    assert_eq!(http(&addr, "POST", "/v1/events", &event("b")).0, 202);
    assert_eq!(http(&addr, "GET", "/health", "").0, 200);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
}

/// In process: once the WAL fails, /health answers 503 and the failure
/// future the server waits on resolves, with no request involved.
#[tokio::test]
async fn health_fails_and_the_failure_is_signalled_once_the_wal_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    c.wal.min_free_bytes = 0;
    let fs = SimFs::new();
    let offsets = Arc::new(OffsetStore::open(&dir.path().join("offsets")).unwrap());
    let wal = Arc::new(
        Wal::open(
            c.wal_config(),
            Arc::new(fs.clone()) as Arc<dyn Filesystem>,
            0,
        )
        .unwrap()
        .0,
    );
    let state = Arc::new(AppState::new(&c, wal.clone(), offsets));
    let health = || async {
        app(state.clone())
            .oneshot(
                axum::http::Request::get("/health")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap()
            .status()
    };
    assert_eq!(health().await, 200);
    let failed = wal.failed();
    fs.inject(Fault::Sync(FaultKind::Io));
    let w = wal.clone();
    let r = tokio::task::spawn_blocking(move || w.append_blocking(vec![super::rec("x")]))
        .await
        .unwrap();
    assert!(r.is_err());
    tokio::time::timeout(Duration::from_secs(30), failed)
        .await
        .expect("the failure is signalled without any request waiting");
    assert_eq!(health().await, 503);
}

/// Offsets of the frames of a segment file (checked on real, intact bytes).
fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = format::HEADER_LEN;
    while at + format::FRAME_HEADER_LEN <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push(at);
        at += format::frame_len(len);
    }
    out
}

fn dump_ids(data: &Path) -> Vec<String> {
    crate::support::wal_dump_ids(data)
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// 100 single events acknowledged with Kafka unreachable, SIGKILL, frame 10's
/// length set to 0x00F00000 (past the end of the file) in the last segment,
/// restart: exactly one record is lost and counted; the 99 others are kept.
#[test]
fn a_damaged_frame_length_after_kill_9_is_counted_exactly_by_a_restarted_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut d, addr) = daemon(&data, &[], &dir.path().join("log1"));
    let ids: Vec<String> = (1..=100).map(|i| format!("e{i}")).collect();
    for id in &ids {
        let (status, body) = http(&addr, "POST", "/v1/events", &event(id));
        assert_eq!(status, 202, "{body}");
    }
    d.child.kill().unwrap(); // SIGKILL
    d.child.wait().unwrap();

    let wal_dir = data.join("wal");
    let names: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let path = wal_dir.join(&names[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let frames = frame_offsets(&bytes);
    assert_eq!(frames.len(), 100);
    let at = frames[9];
    bytes[at + 4..at + 8].copy_from_slice(&0x00F0_0000u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();

    // The offline check sees the exact loss before any restart.
    let verify = Command::new(EXE)
        .args(["wal", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "{out}");
    assert!(out.contains("10..=10"), "{out}");

    let log = dir.path().join("log2");
    let (d, addr) = daemon(&data, &[], &log);
    let (_, metrics) = http(&addr, "GET", "/metrics", "");
    let lost = metric(&metrics, "sluice_wal_lost_records_total");
    eprintln!("lost_records after restart: {lost}");
    assert_eq!(lost, 1.0);
    assert_eq!(metric(&metrics, "sluice_wal_quarantined_files_total"), 1.0);
    assert!(d.stop().success());
    let logged = std::fs::read_to_string(&log).unwrap();
    let line = logged
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"] == "WAL records lost" || v["message"] == "WAL records lost"
        })
        .unwrap_or_else(|| panic!("loss logged: {logged}"));
    let fields = if line["fields"].is_object() {
        &line["fields"]
    } else {
        &line
    };
    assert_eq!(fields["first_seq"], 10, "{line}");
    assert_eq!(fields["last_seq"], 10, "{line}");

    let kept: BTreeSet<String> = dump_ids(&data).into_iter().collect();
    let expected: BTreeSet<String> = ids.iter().filter(|id| *id != "e10").cloned().collect();
    eprintln!("records readable after restart: {}", kept.len());
    assert_eq!(kept, expected);
    let quarantined: Vec<_> = std::fs::read_dir(data.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let base = format!("{}.corrupt-{at}.", names[0]);
    assert!(quarantined[0].starts_with(&base), "{quarantined:?}");
}

/// 100 single events acknowledged with Kafka unreachable, SIGKILL, one byte
/// of the last segment's header damaged, restart: nothing is lost, receipt
/// 50 still knows its record, and the next POST gets 101, not a number an
/// acknowledged record already has.
#[test]
fn a_damaged_header_byte_after_kill_9_loses_nothing_and_reuses_no_number() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (d, addr) = daemon(&data, &[], &dir.path().join("log1"));
    for i in 1..=100 {
        let (status, body) = http(&addr, "POST", "/v1/events", &event(&format!("e{i}")));
        assert_eq!(status, 202, "{body}");
    }
    d.kill_9();
    let path = data.join("wal").join(format::segment_name(1));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] = 0;
    std::fs::write(&path, &bytes).unwrap();

    let (d, addr) = daemon(&data, &[], &dir.path().join("log2"));
    let (_, metrics) = http(&addr, "GET", "/metrics", "");
    assert_eq!(metric(&metrics, "sluice_wal_lost_records_total"), 0.0);
    let (_, receipt) = http(&addr, "GET", "/v1/receipts/50", "");
    let receipt: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    assert_eq!(receipt["durable"], true, "{receipt}");
    assert_eq!(receipt["status"], "pending", "{receipt}");
    let (status, body) = http(&addr, "POST", "/v1/events", &event("e101"));
    assert_eq!(status, 202, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["first_seq"], 101, "{body}");
    assert!(d.stop().success());
    let ids = dump_ids(&data);
    assert_eq!(ids.len(), 101);
}
