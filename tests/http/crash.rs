//! SIGKILL a real `sluice serve` under load from several clients, restart
//! it, and check that every event that got a 202 is in the WAL at the
//! sequence number its response named.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{Wal, WalConfig};

use super::{batch, http_client, post_tcp, wal_records};
use crate::support::{Daemon, Serve};

fn start(data: &Path) -> (Daemon, SocketAddr) {
    let d = Serve::new(data)
        // An unreachable broker: nothing is delivered, so GC never deletes
        // a segment the final check reads from seq 1.
        .brokers("127.0.0.1:1")
        .log(Path::new("/dev/null"))
        .start();
    let addr = d.socket_addr();
    (d, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    for cycle in 0..3 {
        let (mut daemon, addr) = start(dir.path());
        let clients: Vec<_> = (0..6)
            .map(|c| {
                let acked = acked.clone();
                tokio::spawn(async move {
                    let client = http_client();
                    for r in 0.. {
                        let n = if r % 2 == 0 { 1 } else { 25 };
                        let (body, good) = batch(&format!("k{cycle}-c{c}-r{r}"), n, 0);
                        match post_tcp(&client, addr, body).await {
                            Ok((StatusCode::ACCEPTED, json)) => {
                                let first = json["first_seq"].as_u64().unwrap();
                                let mut a = acked.lock().unwrap();
                                for (i, id) in good.into_iter().enumerate() {
                                    a.insert(first + i as u64, id);
                                }
                            }
                            Ok((status, json)) => panic!("unexpected {status}: {json}"),
                            Err(_) => break, // the daemon was killed
                        }
                    }
                })
            })
            .collect();
        let before = acked.lock().unwrap().len();
        let t0 = Instant::now();
        while acked.lock().unwrap().len() < before + 300 {
            assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(15 * cycle)).await;
        daemon.child.kill().unwrap(); // SIGKILL, mid-load
        daemon.child.wait().unwrap();
        for c in clients {
            c.await.unwrap();
        }
    }
    // A last restart proves the daemon recovers and serves; then inspect.
    let (mut daemon, addr) = start(dir.path());
    let (status, _) = post_tcp(&http_client(), addr, batch("final", 1, 0).0)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();

    let wal = Wal::open(
        WalConfig::new(dir.path()),
        Arc::new(StdFs) as Arc<dyn Filesystem>,
        0,
    )
    .unwrap()
    .0;
    let on_disk: BTreeMap<u64, String> = wal_records(&wal)
        .into_iter()
        .map(|(seq, r)| {
            (
                seq,
                String::from_utf8(r.header("id").unwrap().to_vec()).unwrap(),
            )
        })
        .collect();
    let acked = acked.lock().unwrap();
    let lost: Vec<_> = acked
        .iter()
        .filter(|(seq, id)| on_disk.get(seq) != Some(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "{} acknowledged, {} in the WAL, 0 lost",
        acked.len(),
        on_disk.len()
    );
}
