//! A Kafka outage longer than librdkafka's message timeout, with real
//! processes: ingest keeps answering 202 until the WAL quota, then 503 with
//! Retry-After; when the broker returns everything acknowledged is delivered.
//! The daemon's RSS is printed before, during and after (not asserted: memory
//! figures belong in benchmarks, not in tests that can flake).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice::dev::consume::consume;

use crate::support::{Broker, Daemon};

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_string(),
        body.to_string(),
    )
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn outage_past_the_message_timeout_then_quota_then_full_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), None);
    let brokers = broker.addr.clone();
    let mut daemon = Daemon::spawn(
        &dir.path().join("data"),
        Some(&brokers),
        &[
            ("SLUICE_WAL_SEGMENT_BYTES", "1048576"),
            ("SLUICE_WAL_MAX_BYTES", "16777216"),
            ("SLUICE_WAL_MIN_FREE_BYTES", "0"),
            ("SLUICE_KAFKA_MESSAGE_TIMEOUT_MS", "1000"),
            ("SLUICE_REPLAY_BACKOFF_MAX_MS", "300"),
        ],
    );
    let addr = daemon.addr.clone();
    let mut acked = HashSet::new();
    let mut post = |tag: &str, n: usize| {
        let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
        let events: Vec<String> = ids
            .iter()
            .map(|id| {
                format!(
                    r#"{{"id":"{id}","tenant_id":"t","source":"s","message":"{}"}}"#,
                    "x".repeat(180)
                )
            })
            .collect();
        let (status, head, body) = http(
            &addr,
            "POST",
            "/v1/events",
            &format!("[{}]", events.join(",")),
        );
        if status == 202 {
            acked.extend(ids);
        }
        (status, head, body)
    };

    for i in 0..20 {
        assert_eq!(post(&format!("warm{i}"), 200).0, 202);
    }
    let rss_before = rss_kib(daemon.child.id());

    signal(broker.child.id(), "USR1"); // Kafka goes away
    let outage = Instant::now();
    let mut during = 0;
    let mut refused = None;
    for i in 0.. {
        let (status, head, body) = post(&format!("out{i}"), 500);
        match status {
            202 => during += 1,
            503 => {
                refused = Some((head, body));
                break;
            }
            s => panic!("unexpected {s}: {body}"),
        }
        // Pace the load so the outage outlasts the 1 s message timeout
        // before the 16 MiB quota fills.
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            outage.elapsed() < Duration::from_secs(60),
            "quota never reached"
        );
    }
    let outage_202_secs = outage.elapsed().as_secs_f64();
    assert!(
        outage_202_secs > 1.5,
        "202s for {outage_202_secs:.1}s, longer than the message timeout"
    );
    assert!(during > 10);
    let (head, body) = refused.unwrap();
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
    assert!(body.contains("WAL is full"), "{body}");
    let (ready, _, ready_body) = http(&addr, "GET", "/ready", "");
    assert_eq!(ready, 503, "{ready_body}");
    let stats = http(&addr, "GET", "/stats", "").2;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        stats["replay"]["retries"].as_u64().unwrap() >= 1,
        "timed-out deliveries were retried: {stats}"
    );
    assert_eq!(stats["kafka"]["connected"], false);
    let rss_full = rss_kib(daemon.child.id());

    signal(broker.child.id(), "USR2"); // Kafka is back
    let t0 = Instant::now();
    loop {
        let s: serde_json::Value =
            serde_json::from_str(&http(&addr, "GET", "/stats", "").2).unwrap();
        if s["replay"]["lag_records"] == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no catch-up: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Space comes back as GC runs behind the committed offset.
    let t0 = Instant::now();
    while http(&addr, "GET", "/ready", "").0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(post("after", 10).0, 202);
    let rss_after = rss_kib(daemon.child.id());
    signal(daemon.child.id(), "TERM");
    assert!(daemon.child.wait().unwrap().success());

    let mut consumed = HashSet::new();
    consume(
        &brokers,
        "events",
        true,
        None,
        Duration::from_secs(3),
        |c| {
            consumed.insert(c.header("id").unwrap().to_string());
        },
    )
    .unwrap();
    drop(broker);
    let lost = acked.difference(&consumed).count();
    eprintln!(
        "outage: 202s for {outage_202_secs:.1}s of outage ({during} batches), then 503 at quota; acknowledged {} events, lost {lost}; daemon RSS {} MiB before, {} MiB at quota, {} MiB after recovery",
        acked.len(),
        rss_before / 1024,
        rss_full / 1024,
        rss_after / 1024
    );
    assert_eq!(lost, 0);
}
