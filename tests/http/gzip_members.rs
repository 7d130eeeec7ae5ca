//! Gzip bodies made of many members: the decoder must not hold a Tokio
//! worker thread while it walks members that produce little or no output,
//! or /health, /metrics and the watchdog stall behind it.

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
    // ~10 MB each: 500,000 empty members, and 300,000 members of one tiny
    // event line (more members than max-events-per-request).
    let empty = members(b"", 500_000);
    let tiny = members(
        b"{\"tenant_id\":\"a\",\"source\":\"s\",\"message\":\"m\"}\n",
        300_000,
    );
    assert!(empty.len() > 9_000_000 && tiny.len() > 9_000_000);
    let headers = [
        ("Content-Type", "application/x-ndjson"),
        ("Content-Encoding", "gzip"),
    ];
    let (statuses, health) = std::thread::scope(|s| {
        let posts: Vec<_> = [&empty, &tiny, &empty, &tiny]
            .into_iter()
            .map(|body| {
                s.spawn(|| {
                    let r = d.post("/v1/events", &headers, body);
                    (r.status, String::from_utf8_lossy(&r.body).into_owned())
                })
            })
            .collect();
        // Let the bodies arrive, then ask for /health while they decode.
        std::thread::sleep(Duration::from_millis(300));
        let mut health = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            let status = d.get("/health").status;
            health.push((status, t0.elapsed()));
        }
        let statuses: Vec<_> = posts.into_iter().map(|h| h.join().unwrap()).collect();
        (statuses, health)
    });
    eprintln!("POST answers {statuses:?}; /health {health:?}");
    for (status, body) in &statuses {
        assert!(
            *status == 400 || *status == 413,
            "{status} {body}: refused as a client error"
        );
        assert!(body.contains("gzip"), "names what was wrong: {body}");
    }
    for (status, took) in &health {
        assert_eq!(*status, 200);
        // Generous: a blocked worker held /health for 8 s on a debug build.
        assert!(
            *took < Duration::from_secs(2),
            "/health took {took:?} with gzip bodies in flight"
        );
    }
}
