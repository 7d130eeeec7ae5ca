//! Gzip bodies made of many members: the decoder must not hold a Tokio
//! worker thread while it walks members that produce little or no output,
//! or /health, /metrics and the watchdog stall behind it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::daemon::{gzip, Daemon};

/// `n` copies of the gzip member of `data`, one after another (RFC 1952
/// allows it; `gzip.compress(b"") * n` in Python).
fn members(data: &[u8], n: usize) -> Vec<u8> {
    let one = gzip(data);
    let mut out = Vec::with_capacity(one.len() * n);
    for _ in 0..n {
        out.extend_from_slice(&one);
    }
    out
}

#[test]
fn health_answers_promptly_while_bodies_of_many_gzip_members_are_in_flight() {
    let d = Daemon::start("");
    // Just under max-body-bytes (10 MiB) each: 500,000 empty members, and
    // 160,000 members of one small event line (more members than
    // max-events-per-request, 10,000).
    let empty = members(b"", 500_000);
    let tiny = members(
        b"{\"tenant_id\":\"a\",\"source\":\"s\",\"message\":\"m\"}\n",
        160_000,
    );
    for body in [&empty, &tiny] {
        assert!(
            (9_000_000..10_485_760).contains(&body.len()),
            "{} bytes",
            body.len()
        );
    }
    let headers = [
        ("Content-Type", "application/x-ndjson"),
        ("Content-Encoding", "gzip"),
    ];
    let done = AtomicUsize::new(0);
    let bodies = [&empty, &empty, &empty, &empty, &tiny, &tiny];
    let (statuses, health) = std::thread::scope(|s| {
        let posts: Vec<_> = bodies
            .iter()
            .map(|body| {
                let (d, done, headers) = (&d, &done, &headers);
                s.spawn(move || {
                    let r = d.post("/v1/events", headers, body);
                    done.fetch_add(1, Ordering::SeqCst);
                    (r.status, String::from_utf8_lossy(&r.body).into_owned())
                })
            })
            .collect();
        // Ask for /health until every body has been answered (at least a
        // few times): more bodies than the daemon has worker threads.
        let mut health = Vec::new();
        while done.load(Ordering::SeqCst) < bodies.len() || health.len() < 3 {
            let t0 = Instant::now();
            let status = d.get("/health").status;
            health.push((status, t0.elapsed()));
            std::thread::sleep(Duration::from_millis(50));
        }
        let statuses: Vec<_> = posts.into_iter().map(|h| h.join().unwrap()).collect();
        (statuses, health)
    });
    let slowest = health.iter().map(|h| h.1).max().unwrap();
    eprintln!(
        "POST answers {statuses:?}; {} /health probes, slowest {slowest:?}",
        health.len()
    );
    for (status, took) in &health {
        assert_eq!(*status, 200);
        // Generous: a blocked worker held /health for 8 s on a debug build.
        assert!(
            *took < Duration::from_secs(2),
            "/health took {took:?} with gzip bodies in flight"
        );
    }
    for (status, body) in &statuses {
        assert!(
            *status == 400 || *status == 413,
            "{status} {body}: refused as a client error"
        );
        assert!(body.contains("gzip"), "names what was wrong: {body}");
    }
}
