//! Hostile clients against a real daemon: slowloris headers and bodies, a
//! client vanishing mid-request, a thousand idle connections, oversized
//! headers, the connection cap. Well-behaved clients keep getting 202s.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Daemon, Serve};

/// A daemon whose Kafka is unreachable, with short HTTP timeouts.
pub(super) fn daemon(env: &[(&str, &str)]) -> Daemon {
    Serve::temp()
        .brokers("127.0.0.1:1")
        .envs(&[
            ("SLUICE_HTTP_HEADER_TIMEOUT_MS", "500"),
            ("SLUICE_HTTP_BODY_TIMEOUT_MS", "1000"),
            ("SLUICE_HTTP_MAX_HEADER_BYTES", "16384"),
            ("SLUICE_REPLAY_DRAIN_TIMEOUT_MS", "100"),
        ])
        .envs(env)
        .start()
}

const EVENT: &str = r#"{"tenant_id":"good","source":"s","message":"m"}"#;

/// A well-behaved request; returns the status.
fn good(addr: &str) -> u16 {
    request(addr, &format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{EVENT}",
        EVENT.len()
    ))
    .0
}

pub(super) fn request(addr: &str, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    (
        resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        resp,
    )
}

fn stats(addr: &str) -> serde_json::Value {
    let (_, resp) = request(
        addr,
        "GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// True once the server has closed the connection (EOF or reset).
pub(super) fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a 408 before the close
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn slowloris_headers_are_cut_while_good_clients_are_served() {
    let d = daemon(&[]);
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(&d.addr).unwrap();
            s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    for _ in 0..3 {
        for s in &mut slow {
            let _ = s.write_all(b"a");
        }
        assert_eq!(good(&d.addr), 202, "good clients are served meanwhile");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The 500 ms header deadline closes every slow connection.
    for s in &mut slow {
        assert!(
            closed_by_server(s, Duration::from_secs(5)),
            "slowloris connection left open"
        );
    }
    assert_eq!(good(&d.addr), 202);
}

#[test]
fn slow_body_gets_408_and_writes_nothing() {
    let d = daemon(&[]);
    let before = stats(&d.addr)["wal"]["records"].clone();
    let mut s = TcpStream::connect(&d.addr).unwrap();
    write!(s, "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", EVENT.len()).unwrap();
    s.write_all(&EVENT.as_bytes()[..5]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert_eq!(good(&d.addr), 202);
    assert_eq!(
        stats(&d.addr)["wal"]["records"].as_u64(),
        before.as_u64().map(|b| b + 1),
        "only the good event"
    );
}

#[test]
fn a_client_vanishing_mid_request_leaves_no_partial_batch() {
    let d = daemon(&[]);
    let batch = format!("[{}]", vec![EVENT; 100].join(","));
    for cut in [10, batch.len() / 2, batch.len() - 1] {
        let mut s = TcpStream::connect(&d.addr).unwrap();
        write!(s, "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", batch.len()).unwrap();
        s.write_all(&batch.as_bytes()[..cut]).unwrap();
        drop(s); // gone
    }
    std::thread::sleep(Duration::from_millis(300));
    let st = stats(&d.addr);
    assert_eq!(
        st["wal"]["records"], 0,
        "nothing of a cut body is written: {st}"
    );
    assert_eq!(st["ingest"]["events_accepted"], 0);
    assert_eq!(good(&d.addr), 202);
    assert_eq!(stats(&d.addr)["wal"]["records"], 1);
}

#[test]
fn a_thousand_idle_connections_do_not_starve_good_clients_and_are_reaped() {
    let d = daemon(&[]);
    let mut idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&d.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    for _ in 0..20 {
        assert_eq!(good(&d.addr), 202);
    }
    eprintln!(
        "20 good requests beside 1000 idle connections in {:?}",
        t0.elapsed()
    );
    for s in &mut idle {
        assert!(
            closed_by_server(s, Duration::from_secs(5)),
            "idle connection not reaped"
        );
    }
    assert_eq!(good(&d.addr), 202);
}

#[test]
fn oversized_headers_get_431() {
    let d = daemon(&[]);
    let big = "x".repeat(32 * 1024);
    let (status, resp) = request(
        &d.addr,
        &format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
    );
    assert_eq!(status, 431, "{resp:.200}");
    assert_eq!(good(&d.addr), 202);
}

#[test]
fn connections_past_the_cap_are_closed_at_once() {
    let d = daemon(&[
        ("SLUICE_HTTP_MAX_CONNECTIONS", "20"),
        ("SLUICE_HTTP_HEADER_TIMEOUT_MS", "3000"),
    ]);
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&d.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(&d.addr).unwrap();
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(2)),
        "the 21st connection is refused"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(good(&d.addr), 202, "slots come back when connections close");
    let metrics = request(
        &d.addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .1;
    assert!(
        metrics.contains("sluice_http_connections_refused_total 1"),
        "{}",
        &metrics[metrics.len().saturating_sub(300)..]
    );
}
