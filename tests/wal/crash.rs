//! Kills a real process that is appending with SIGKILL, several times over the
//! same data directory, and checks every acknowledged record after each kill.
//! The child is this test binary, re-executed with `child_appender` selected.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{open_std, read_all, rec, small_cfg};

const CHILD_ENV: &str = "SLUICE_TEST_CRASH_DIR";

/// The child: 8 threads append batches forever and print each acknowledged
/// range as `ack <first> <last> <tag-prefix>` once the append returned.
#[test]
#[ignore = "child process of sigkill_during_appends_loses_no_acknowledged_record"]
fn child_appender() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut cfg = small_cfg(Path::new(&dir));
    cfg.segment_bytes = 16 * 1024;
    let wal = Arc::new(open_std(&cfg, 0).0);
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let pid = std::process::id();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (wal, out) = (wal.clone(), out.clone());
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let prefix = format!("{pid}-{t}-{i}");
                    let n = 1 + (i % 13) as usize;
                    let batch = (0..n).map(|j| rec(&format!("{prefix}-{j}"))).collect();
                    let r = wal.append_blocking(batch).expect("append");
                    use std::io::Write;
                    let mut out = out.lock().unwrap();
                    writeln!(out, "ack {} {} {prefix}", r.first, r.last).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn sigkill_during_appends_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for cycle in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                "crash::child_appender",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        // Wait for some acknowledgements, then kill at a varied moment.
        let start = Instant::now();
        while lines.lock().unwrap().len() < 50 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "child made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20 + cycle * 37));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for line in lines.lock().unwrap().iter() {
            let mut parts = line.split(' ');
            if parts.next() != Some("ack") {
                continue;
            }
            let first: u64 = parts.next().unwrap().parse().unwrap();
            let last: u64 = parts.next().unwrap().parse().unwrap();
            let prefix = parts.next().unwrap();
            for (j, seq) in (first..=last).enumerate() {
                acked.insert(seq, format!("{prefix}-{j}"));
            }
        }
        let (wal, report) = open_std(&small_cfg(dir.path()), 0);
        assert!(report.lost.is_empty(), "{report:?}");
        let (recs, gaps) = read_all(&wal, 1);
        assert!(gaps.is_empty(), "{gaps:?}");
        let on_disk: BTreeMap<u64, String> = recs.into_iter().collect();
        let seqs: Vec<u64> = on_disk.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "contiguous"
        );
        for (seq, tag) in &acked {
            assert_eq!(
                on_disk.get(seq),
                Some(tag),
                "cycle {cycle}: acknowledged seq {seq}"
            );
        }
        eprintln!(
            "cycle {cycle}: {} acknowledged, {} on disk, {} bytes cut",
            acked.len(),
            on_disk.len(),
            report.truncated_bytes
        );
    }
}
