//! sluice against a real Apache Kafka cluster: KRaft nodes started from the
//! broker's jars by `cluster.py` beside this file (`support::apache_kafka`).
//! Skipped, with a line on stderr, when the jars are not in the cache
//! (`make kafka-jars`) unless `SLUICE_REQUIRE_KAFKA=1`.
//!
//! Most cases take turns on one cluster per run of this binary
//! (`apache_kafka::shared`: 3 broker-only nodes and a controller-only one,
//! started once, 30-60 s here); each brings back what it broke, and the
//! next turn starts with every node up (`redrive` also starts a 1-node
//! target). `security` and `sequence` share a second cluster, with SASL
//! (`Cluster::shared_sasl`: 3 combined nodes), each on its own topics.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

mod archive;
mod common;
mod failover;
mod faults;
mod redrive;
mod secure;
mod security;
mod sequence;
#[path = "../support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One HTTP/1.1 request; the status (0 when the connection failed) and body.
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut resp = String::new();
    if s.write_all(head.as_bytes()).is_err()
        || s.write_all(body).is_err()
        || s.read_to_string(&mut resp).is_err()
    {
        return (0, String::new());
    }
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        return (0, resp);
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

pub fn stats(addr: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/stats", b"");
    assert_eq!(status, 200, "/stats: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until sluice has delivered everything it accepted.
pub fn wait_delivered(addr: &str, within: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let s = stats(addr);
        let r = &s["replay"];
        if r["lag_records"] == 0 && r["delivered_through"] == r["last_seq"] {
            return s;
        }
        assert!(t0.elapsed() < within, "not delivered in {within:?}: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
