//! Disk faults: ENOSPC mid-write on the simulated disk, a real size-limited
//! tmpfs (skipped with a message where mounting is not allowed), and EIO on
//! fsync in a real daemon process (debug-build fault hook).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use sluice::wal::io::{Fault, FaultKind, Filesystem, SimFs};
use sluice::wal::Wal;

use super::{ev, harness_with, wal_records, JSON};
use crate::support::{Daemon, Serve};

#[tokio::test]
async fn enospc_mid_write_keeps_every_202_and_resumes_after_restart() {
    let fs = SimFs::new();
    let h = harness_with(|_| {}, Arc::new(fs.clone()));
    let r = h
        .post(
            JSON,
            serde_json::json!([ev("a", "1"), ev("a", "2"), ev("a", "3")]).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    fs.inject(Fault::Write {
        written: 10,
        kind: FaultKind::NoSpace,
    });
    let notified = h.state.fatal.notified();
    let r = h.post(JSON, ev("a", "4").to_string()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    tokio::time::timeout(Duration::from_secs(1), notified)
        .await
        .expect("exit requested");
    assert_eq!(
        h.post(JSON, ev("a", "5").to_string()).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Restart (the process exited; the partial frame is still in the file).
    let cfg = h.state.wal.config().clone();
    drop(h);
    let (wal, report) = Wal::open(cfg, Arc::new(fs.clone()) as Arc<dyn Filesystem>, 0).unwrap();
    assert_eq!(report.truncated_bytes, 10, "the torn frame is cut");
    let recs = wal_records(&wal);
    let msgs: Vec<_> = recs
        .iter()
        .map(|(_, r)| super::value(r)["message"].clone())
        .collect();
    assert_eq!(msgs, ["1", "2", "3"]);
    assert_eq!(
        wal.append(vec![recs[0].1.encode()]).await.unwrap().first,
        4,
        "resumes"
    );
}

/// A daemon whose Kafka is unreachable (replay is irrelevant here). Its log
/// goes nowhere: it must take no space on a filesystem being filled.
fn daemon(data: &Path, env: &[(&str, &str)]) -> (Daemon, String) {
    let d = Serve::new(data)
        .brokers("127.0.0.1:1")
        .envs(&[
            ("SLUICE_REPLAY_DRAIN_TIMEOUT_MS", "300"),
            ("SLUICE_WAL_SEGMENT_BYTES", "262144"),
        ])
        .envs(env)
        .log(Path::new("/dev/null"))
        .start();
    let addr = d.addr.clone();
    (d, addr)
}

/// Posts `n` events tagged `tag`; returns the status and the ids if 202.
fn post(addr: &str, tag: &str, n: usize) -> (u16, Vec<String>, String) {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let events: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                r#"{{"id":"{id}","tenant_id":"t","source":"s","message":"{}"}}"#,
                "x".repeat(200)
            )
        })
        .collect();
    let body = format!("[{}]", events.join(","));
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, Vec::new(), "connect failed".into());
    };
    let _ = write!(
        s,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() || resp.len() < 12 {
        return (0, Vec::new(), resp);
    }
    let status = resp[9..12].parse().unwrap_or(0);
    (status, if status == 202 { ids } else { Vec::new() }, resp)
}

fn wait_exit(d: &mut Daemon) -> std::process::ExitStatus {
    d.wait_exit(Duration::from_secs(30))
        .expect("daemon did not exit")
}

/// Ids in the WAL, read by the offline tool (which checks every CRC).
fn wal_ids(data: &Path) -> HashSet<String> {
    crate::support::wal_dump_ids(data).into_iter().collect()
}

struct Tmpfs(PathBuf);
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_real_full_filesystem_sheds_load_before_enospc_and_survives_enospc() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); the simulated-disk tests cover ENOSPC");
        return;
    }
    let _umount = Tmpfs(mnt.clone());
    let data = mnt.join("data");
    let mut acked = HashSet::new();

    // 1. With headroom configured, sluice answers 503 before the disk fills,
    //    stays up, and accepts again when space returns.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 1 << 20]).unwrap();
    let (mut d, addr) = daemon(&data, &[("SLUICE_WAL_MIN_FREE_BYTES", "1048576")]);
    let mut last = (0, Vec::new(), String::new());
    for i in 0..200 {
        last = post(&addr, &format!("h{i}"), 50);
        if last.0 != 202 {
            break;
        }
        acked.extend(last.1.clone());
    }
    assert_eq!(last.0, 503, "{}", last.2);
    assert!(last.2.contains("disk space low"), "{}", last.2);
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "disk low is not a failure"
    );
    std::fs::remove_file(&filler).unwrap();
    let again = post(&addr, "space-back", 5);
    assert_eq!(again.0, 202, "{}", again.2);
    acked.extend(again.1);
    d.signal("TERM");
    assert!(wait_exit(&mut d).success());

    // 2. With no headroom, the disk really fills: ENOSPC mid-write is a
    //    sticky failure, 503, and a non-zero exit. Nothing acknowledged is lost.
    let filler = mnt.join("filler2");
    std::fs::write(&filler, vec![0u8; 1 << 20]).unwrap();
    let (mut d, addr) = daemon(&data, &[("SLUICE_WAL_MIN_FREE_BYTES", "0")]);
    let mut saw_503 = false;
    for i in 0..400 {
        let (status, ids, _) = post(&addr, &format!("f{i}"), 50);
        match status {
            202 => acked.extend(ids),
            503 => {
                saw_503 = true;
                break;
            }
            _ => break, // already exiting
        }
    }
    assert!(saw_503, "ENOSPC answered 503");
    assert_eq!(
        wait_exit(&mut d).code(),
        Some(1),
        "exits non-zero so systemd restarts it"
    );

    // 3. The operator frees space; a restart recovers (cutting the torn
    //    frame) and serves again.
    std::fs::remove_file(&filler).unwrap();
    let (mut d, addr) = daemon(&data, &[("SLUICE_WAL_MIN_FREE_BYTES", "0")]);
    let (status, ids, body) = post(&addr, "recovered", 5);
    assert_eq!(status, 202, "{body}");
    acked.extend(ids);
    d.signal("TERM");
    assert!(wait_exit(&mut d).success());
    let on_disk = wal_ids(&data);
    let missing: Vec<_> = acked.iter().filter(|id| !on_disk.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged ids missing",
        missing.len()
    );
    eprintln!(
        "tmpfs: {} acknowledged events, all present after ENOSPC",
        acked.len()
    );
}

#[test]
fn eio_on_fsync_is_sticky_exits_non_zero_and_recovers_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut d, addr) = daemon(&data, &[("SLUICE_DEBUG_FAIL_FSYNC_AFTER", "25")]);
    let mut acked = HashSet::new();
    let mut codes = Vec::new();
    for i in 0..100 {
        let (status, ids, _) = post(&addr, &format!("e{i}"), 3);
        codes.push(status);
        if status != 202 {
            break;
        }
        acked.extend(ids);
    }
    assert_eq!(codes.last(), Some(&503), "{codes:?}");
    assert!(acked.len() >= 30);
    assert_eq!(wait_exit(&mut d).code(), Some(1));

    // Restart without the fault: recovery is clean and ingest works.
    let (mut d, addr) = daemon(&data, &[]);
    let (status, ids, body) = post(&addr, "after", 2);
    assert_eq!(status, 202, "{body}");
    acked.extend(ids);
    d.signal("TERM");
    assert!(wait_exit(&mut d).success());
    let on_disk = wal_ids(&data);
    assert!(
        acked.iter().all(|id| on_disk.contains(id)),
        "every 202 survived"
    );
}
