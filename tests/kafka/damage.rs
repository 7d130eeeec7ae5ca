//! A real daemon started on a damaged data directory: it starts, serves,
//! quarantines, reports the exact lost range in its log and metrics, and
//! delivers every intact record.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::dev::consume::consume;
use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{format, Wal};

use super::daemon::serve;
use super::{event, wal_cfg};
use crate::support::{Broker, Serve};

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn daemon_on_a_damaged_wal_reports_the_exact_loss_and_delivers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 300 records in 4 KiB segments, written by the library as the daemon would.
    {
        let wal = Wal::open(wal_cfg(&data), Arc::new(StdFs) as Arc<dyn Filesystem>, 0)
            .unwrap()
            .0;
        for n in 0..300 {
            wal.append_blocking(vec![event("dmg", "t", n, 0).encode()])
                .unwrap();
        }
    }
    let mut segs: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some((format::parse_segment_name(p.file_name()?.to_str()?)?, p)))
        .collect();
    segs.sort();
    assert!(segs.len() > 5);
    // A bit flip in the third frame of the third segment: that segment's
    // records from its third on are lost, exactly.
    let (first, path) = &segs[2];
    let next = segs[3].0;
    let frame = format::frame_len(event("dmg", "t", 0, 0).encode().len());
    let mut bytes = std::fs::read(path).unwrap();
    bytes[format::HEADER_LEN + 2 * frame + 30] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
    let lost: HashSet<u64> = (first + 2..next).collect();
    // And a torn tail on the last segment (a partial frame, never acknowledged).
    let last = &segs.last().unwrap().1;
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    let broker = Broker::start(dir.path(), None);
    let brokers = broker.addr.clone();
    let log_path = dir.path().join("serve.log");
    let daemon = Serve::new(&data)
        .brokers(&brokers)
        .envs(&[
            ("SLUICE_WAL_SEGMENT_BYTES", "4096"),
            ("SLUICE_WAL_MIN_FREE_BYTES", "0"),
            ("SLUICE_LOG_FORMAT", "json"),
        ])
        .log(&log_path)
        .start();
    let addr = daemon.addr.clone();
    let t0 = Instant::now();
    loop {
        let stats: serde_json::Value = serde_json::from_str(&get(&addr, "/stats")).unwrap();
        if stats["replay"]["lag_records"] == 0 && stats["replay"]["last_seq"].as_u64() > Some(0) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = get(&addr, "/metrics");
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(sample("sluice_wal_lost_records_total"), lost.len() as f64);
    assert_eq!(sample("sluice_replay_gap_records_total"), lost.len() as f64);
    assert!(
        sample("sluice_wal_truncated_bytes_total") > 0.0,
        "torn tail cut"
    );
    assert!(
        sample("sluice_wal_quarantined_files_total") >= 2.0,
        "damaged segment and cut tail kept"
    );
    let receipt = |addr: &str, seq: u64| -> serde_json::Value {
        serde_json::from_str(&get(addr, &format!("/v1/receipts/{seq}"))).unwrap()
    };
    let r = receipt(&addr, first + 2);
    assert_eq!(r["status"], "lost", "{r}");
    assert_eq!(r["delivered"], false, "{r}");
    assert_eq!(r["durable"], false, "{r}");
    // Delivered once the offset is committed (every commit interval).
    let t0 = Instant::now();
    while receipt(&addr, first + 1)["status"] != "delivered" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            receipt(&addr, first + 1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(daemon.stop().success());
    // Across a restart (GC may have removed the damaged segment's copy by
    // now; the offset store remembers).
    let again = serve(&data, &brokers, &[], &[]);
    for seq in [first + 2, next - 1] {
        let r = receipt(&again.addr, seq);
        assert_eq!(r["status"], "lost", "{r}");
    }
    assert_eq!(receipt(&again.addr, next)["status"], "delivered");
    assert!(again.stop().success());

    let log = std::fs::read_to_string(&log_path).unwrap();
    let loss_line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "WAL records lost")
        .unwrap_or_else(|| panic!("no loss line in:\n{log}"));
    assert_eq!(loss_line["first_seq"], first + 2);
    assert_eq!(loss_line["last_seq"], next - 1);
    assert_eq!(loss_line["reason"], "corrupt");
    let quarantined: Vec<_> = std::fs::read_dir(data.join("quarantine"))
        .unwrap()
        .collect();
    assert!(quarantined.len() >= 2);

    let mut delivered = HashSet::new();
    consume(
        &brokers,
        "events",
        true,
        None,
        Duration::from_secs(3),
        |c| {
            delivered.insert(c.header("seq").unwrap().parse::<u64>().unwrap());
        },
    )
    .unwrap();
    drop(broker);
    // Every intact record (all but the lost range and the torn last one).
    for seq in 1..300u64 {
        assert_eq!(delivered.contains(&seq), !lost.contains(&seq), "seq {seq}");
    }
}
