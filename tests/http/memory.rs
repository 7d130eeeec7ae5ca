//! Memory per request is bounded by the body limit, not by the body's shape:
//! measured on a real daemon's peak RSS.

use super::daemon::{gzip, Daemon};

/// `[0,0,...]`: five million values in a 10 MB body that gzips to ~10 KB.
/// A parser that builds a value tree spends about 50 bytes of heap per body
/// byte on it.
fn zeros_body() -> Vec<u8> {
    let mut b = Vec::with_capacity(10_000_001);
    b.push(b'[');
    for i in 0..5_000_000 {
        if i > 0 {
            b.push(b',');
        }
        b.push(b'0');
    }
    b.push(b']');
    b
}

#[test]
fn sixteen_parallel_tiny_gzip_bombs_of_zeros_stay_under_512_mib() {
    let d = Daemon::start("");
    let body = gzip(&zeros_body());
    assert!(body.len() < 20_000, "{} bytes", body.len());
    let before = d.proc_status_kb("VmHWM");
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    d.post(
                        "/v1/events",
                        &[
                            ("Content-Type", "application/json"),
                            ("Content-Encoding", "gzip"),
                        ],
                        &body,
                    )
                    .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = d.proc_status_kb("VmHWM");
    eprintln!("VmHWM before {before} kB, after 16 bodies {peak} kB; statuses {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 413 || *s == 400 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&413), "{statuses:?}");
    assert!(peak < 512 * 1024, "peak RSS {peak} kB");
}

/// The same shape inside one event: it cannot be split at the event limit,
/// so only the per-event bound holds it.
#[test]
fn one_event_holding_millions_of_values_stays_under_512_mib() {
    let d = Daemon::start("");
    let zeros = zeros_body();
    let mut one = br#"[{"tenant_id":"a","source":"s","message":"m","x":"#.to_vec();
    one.extend_from_slice(&zeros[..zeros.len() - 60]);
    one.truncate(one.len() - 1); // the trailing comma
    one.extend_from_slice(b"]}]");
    let body = gzip(&one);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    d.post(
                        "/v1/events",
                        &[
                            ("Content-Type", "application/json"),
                            ("Content-Encoding", "gzip"),
                        ],
                        &body,
                    )
                    .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = d.proc_status_kb("VmHWM");
    eprintln!("VmHWM after 16 one-event bodies {peak} kB; statuses {statuses:?}");
    // 408: on a loaded machine some of the 16 bodies are not read in time
    // (the body timeout); that is a refusal too, and it bounds nothing less.
    assert!(
        statuses.iter().all(|s| matches!(*s, 413 | 503 | 408)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&413), "{statuses:?}");
    assert!(peak < 512 * 1024, "peak RSS {peak} kB");
}

/// CSV rows of millions of empty cells: the reader keeps an offset per cell,
/// so a row must be refused before it is read.
#[test]
fn csv_rows_of_millions_of_cells_stay_under_512_mib() {
    let d = Daemon::start("");
    let mut wide = b"tenant_id,source,message\n".to_vec();
    wide.extend(std::iter::repeat_n(b',', 9_000_000));
    wide.push(b'\n');
    let mut header = vec![b'a'; 1];
    header.extend(std::iter::repeat_n(b",a".iter().copied(), 4_500_000).flatten());
    header.push(b'\n');
    for body in [wide, header] {
        let body = gzip(&body);
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        d.post(
                            "/v1/events",
                            &[("Content-Type", "text/csv"), ("Content-Encoding", "gzip")],
                            &body,
                        )
                        .status
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let peak = d.proc_status_kb("VmHWM");
        eprintln!("VmHWM after 16 wide CSV bodies {peak} kB; statuses {statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == 400 || *s == 503),
            "{statuses:?}"
        );
        assert!(peak < 512 * 1024, "peak RSS {peak} kB");
    }
}
