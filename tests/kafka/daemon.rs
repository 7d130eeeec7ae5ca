//! Real processes for the tests that need one: `sluice dev-broker`, `sluice
//! serve` (optionally under a wrapper such as strace), and plain HTTP/1.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::Serve;
pub use crate::support::{Broker, Daemon, EXE};

/// One HTTP/1.1 request; returns the status and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

pub fn get(addr: &str, path: &str) -> String {
    http(addr, "GET", path, "text/plain", b"").1
}

pub fn get_json(addr: &str, path: &str) -> serde_json::Value {
    serde_json::from_str(&get(addr, path)).unwrap()
}

/// A sample of a Prometheus metric without labels.
pub fn metric(addr: &str, name: &str) -> f64 {
    get(addr, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// POSTs events `{id: prefix-n, tenant_id, source, message}` for `range`;
/// returns the response's last_seq.
pub fn post_events(addr: &str, prefix: &str, range: std::ops::Range<usize>) -> u64 {
    let events: Vec<_> = range
        .map(|n| serde_json::json!({"id": format!("{prefix}-{n}"), "tenant_id": "t", "source": "test", "message": format!("event {n} of {prefix}")}))
        .collect();
    let (status, body) = http(
        addr,
        "POST",
        "/v1/events",
        "application/json",
        &serde_json::to_vec(&events).unwrap(),
    );
    assert_eq!(status, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["last_seq"].as_u64().unwrap()
}

/// `sluice serve` on `data` with 4 KiB segments and a 20 ms commit interval
/// (so GC runs constantly), prefixed by `wrapper` if not empty.
pub fn serve(data: &Path, brokers: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
    Serve::new(data)
        .brokers(brokers)
        .envs(&[
            ("SLUICE_WAL_SEGMENT_BYTES", "4096"),
            ("SLUICE_WAL_MIN_FREE_BYTES", "0"),
            ("SLUICE_REPLAY_COMMIT_INTERVAL_MS", "20"),
            ("SLUICE_LOG_FORMAT", "json"),
        ])
        .envs(env)
        .wrapper(wrapper)
        .start()
}

/// Waits until every record up to `seq` is committed.
pub fn wait_committed(daemon: &Daemon, seq: u64) {
    let t0 = Instant::now();
    loop {
        let stats = get_json(&daemon.addr, "/stats");
        if stats["replay"]["committed"].as_u64() >= Some(seq) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{stats}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every `seq` and `id` header in `topic`, in consumed order.
pub fn consume_all(brokers: &str, topic: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    sluice::dev::consume::consume(brokers, topic, true, None, Duration::from_secs(3), |c| {
        out.push((
            c.header("seq").unwrap().parse().unwrap(),
            c.header("id").unwrap().to_string(),
        ))
    })
    .unwrap();
    out
}
