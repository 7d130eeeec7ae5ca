//! `sluice wal redrive` as an operator runs it: real processes (`sluice
//! dev-broker`, `sluice serve`, the redrive itself, `sluice consume`), and
//! sources made by the real writers (the daemon's WAL, recovery's quarantine
//! copy, the replayer's dead-letter file).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::replay::dead_letter::DeadLetterFile;
use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{format, Record, Wal, WalConfig};

const EXE: &str = env!("CARGO_BIN_EXE_sluice");

use crate::support::wait_file;

/// A `sluice dev-broker` process, killed on drop.
struct Broker {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start(topics: &[&str]) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(EXE);
        cmd.arg("dev-broker");
        for t in topics {
            cmd.args(["--topic", t]);
        }
        let child = cmd
            .arg("--addr-file")
            .arg(dir.path().join("addr"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = wait_file(&dir.path().join("addr"));
        Broker {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.into(),
    )
}

/// `sluice consume` of exactly `n` records of `topic`, by `seq` header.
fn consume(brokers: &str, topic: &str, n: usize) -> BTreeMap<u64, serde_json::Value> {
    let out = Command::new(EXE)
        .args(["consume", "--brokers", brokers, "--topic", topic])
        .args(["--from-beginning", "--timeout", "5", "--max"])
        .arg((n + 1).to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_seq = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let seq = v["headers"]["seq"].as_str().unwrap().parse().unwrap();
        assert!(
            by_seq.insert(seq, v).is_none(),
            "seq {seq} twice in {topic}"
        );
    }
    assert_eq!(by_seq.len(), n, "{topic}: {by_seq:?}");
    by_seq
}

fn redrive(args: &[&str]) -> (Output, serde_json::Value) {
    let out = Command::new(EXE)
        .args(["wal", "redrive"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "summary: {e}: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, summary)
}

fn wal_files(data: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn committed(data: &Path) -> u64 {
    let out = Command::new(EXE)
        .args(["wal", "stats", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["committed"].as_u64().unwrap()
}

#[test]
fn a_wal_range_goes_to_another_topic_with_its_headers_and_the_offset_stays() {
    let broker = Broker::start(&["events", "events-dlq", "backup"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut serve = Command::new(EXE)
        .env("SLUICE_HTTP_ADMIN_LISTEN", "")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--brokers",
            &broker.addr,
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--addr-file")
        .arg(dir.path().join("addr"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = wait_file(&dir.path().join("addr"));
    let events: Vec<_> = (0..30)
        .map(|n| serde_json::json!({"id": format!("r-{n}"), "tenant_id": format!("t{}", n % 3), "source": "test", "message": format!("event {n}")}))
        .collect();
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/events",
        &serde_json::to_vec(&events).unwrap(),
    );
    assert_eq!(status, 202, "{body}");
    let t0 = Instant::now();
    loop {
        let stats: serde_json::Value =
            serde_json::from_str(&http(&addr, "GET", "/stats", b"").1).unwrap();
        if stats["replay"]["committed"] == 30 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .arg(serve.id().to_string())
        .status()
        .unwrap();
    assert!(serve.wait().unwrap().success());
    std::fs::write(data.join("instance"), "node-a\n").unwrap();
    let before = wal_files(&data);
    assert_eq!(committed(&data), 30);

    let data_arg = data.to_str().unwrap();
    let common = ["--brokers", &broker.addr, "--topic", "backup"];
    let (out, summary) = redrive(
        &[
            &common[..],
            &["--data-dir", data_arg, "--from", "5", "--through", "12"],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{summary} {stderr}");
    assert_eq!(summary["read"], 8);
    assert_eq!(summary["delivered"], 8);
    assert_eq!(summary["failed"], 0);
    assert_eq!(
        (summary["first_seq"].clone(), summary["last_seq"].clone()),
        (5.into(), 12.into())
    );
    assert!(
        stderr.contains("redrive OK: 8 read, 8 confirmed"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no progress bar without a terminal: {stderr:?}"
    );

    let original = consume(&broker.addr, "events", 30);
    let copy = consume(&broker.addr, "backup", 8);
    assert_eq!(
        copy.keys().copied().collect::<Vec<_>>(),
        (5..=12).collect::<Vec<_>>()
    );
    for (seq, c) in &copy {
        let o = &original[seq];
        assert_eq!(c["key"], o["key"]);
        assert_eq!(c["value"], o["value"]);
        assert_eq!(c["timestamp_ms"], o["timestamp_ms"]);
        for h in ["id", "tenant", "received_at", "seq"] {
            assert_eq!(c["headers"][h], o["headers"][h], "header {h} of seq {seq}");
        }
        assert_eq!(c["headers"]["instance"], "node-a");
    }

    // A range reaching past the WAL: what exists is sent, the rest is
    // reported, and the exit status says the range was not all sent.
    let (out, summary) = redrive(
        &[
            &common[..],
            &["--data-dir", data_arg, "--from", "28", "--through", "33"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{summary}");
    assert_eq!(summary["delivered"], 3);
    assert_eq!(summary["unreadable"], 3);
    assert!(
        summary["unreadable_ranges"][0]
            .as_str()
            .unwrap()
            .starts_with("31..=33"),
        "{summary}"
    );

    // Nothing under the data directory changed: not the WAL, not the offset.
    assert_eq!(wal_files(&data), before);
    assert_eq!(committed(&data), 30);
}

fn record(n: usize) -> Record {
    let id = format!("q-{n}");
    Record {
        stream: sluice::wal::DEFAULT_STREAM.to_string(),
        key: Some(format!("t{}", n % 2).into_bytes()),
        value: serde_json::to_vec(&serde_json::json!({"id": id, "n": n, "pad": "x".repeat(100)}))
            .unwrap(),
        headers: vec![
            ("id".into(), id.into_bytes()),
            ("tenant".into(), format!("t{}", n % 2).into_bytes()),
        ],
        timestamp_ms: 1_714_564_800_000 + n as i64,
    }
}

fn quarantined_copy(data: &Path) -> (PathBuf, u64, u64) {
    let mut cfg = WalConfig::new(data);
    cfg.segment_bytes = 4096;
    cfg.min_free_bytes = 0;
    let fs = || Arc::new(StdFs) as Arc<dyn Filesystem>;
    {
        let wal = Wal::open(cfg.clone(), fs(), 0).unwrap().0;
        for n in 1..=100 {
            wal.append_blocking(vec![record(n).encode()]).unwrap();
        }
    }
    let mut firsts: Vec<u64> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .filter_map(|e| format::parse_segment_name(&e.unwrap().file_name().to_string_lossy()))
        .collect();
    firsts.sort();
    assert!(firsts.len() >= 4, "{firsts:?}");
    // A flipped byte in the header of a sealed segment: recovery moves the
    // whole file to quarantine.
    let (first, next) = (firsts[1], firsts[2]);
    let path = data.join("wal").join(format::segment_name(first));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (_wal, report) = Wal::open(cfg, fs(), 0).unwrap();
    let prefix = format!("{}.bad-header.", format::segment_name(first));
    assert_eq!(report.quarantined.len(), 1, "{:?}", report.quarantined);
    let qname = report.quarantined[0].clone();
    assert!(qname.starts_with(&prefix), "{qname} is not {prefix}<ms>");
    (data.join("quarantine").join(qname), first, next - 1)
}

#[test]
fn a_quarantined_segment_and_the_dead_letter_file_are_sent_back() {
    let broker = Broker::start(&["events", "events-dlq", "from-quarantine", "from-dlq"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (copy, first, last) = quarantined_copy(&data);
    let n = (last - first + 1) as usize;
    let (out, summary) = redrive(&[
        "--brokers",
        &broker.addr,
        "--topic",
        "from-quarantine",
        "--segment",
        copy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{summary}");
    assert_eq!(summary["delivered"], n);
    assert_eq!(summary["instance"], serde_json::Value::Null);
    let got = consume(&broker.addr, "from-quarantine", n);
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (first..=last).collect::<Vec<_>>()
    );
    for (seq, c) in &got {
        let want = record(*seq as usize);
        assert_eq!(c["headers"]["id"], format!("q-{seq}"));
        assert_eq!(c["key"], String::from_utf8(want.key.unwrap()).unwrap());
        assert_eq!(
            serde_json::to_vec(&c["value"]).unwrap(),
            want.value,
            "seq {seq}"
        );
        assert_eq!(c["timestamp_ms"], want.timestamp_ms);
    }

    // The dead-letter file as the replayer writes it, one JSON and one
    // binary value, then a line that is not a dead letter.
    let dl = DeadLetterFile::new(&data);
    let mut binary = record(2);
    binary.value = vec![0, 159, 146, 150];
    dl.append(7, "events", "too big", &record(1)).unwrap();
    dl.append(9, "events", "invalid record", &binary).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(dl.path())
        .unwrap()
        .write_all(b"{\"not\":\"a dead letter\"}\n")
        .unwrap();
    std::fs::write(data.join("instance"), "node-b").unwrap();
    let (out, summary) = redrive(&[
        "--brokers",
        &broker.addr,
        "--topic",
        "from-dlq",
        "--dead-letter",
        dl.path().to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a bad line fails the run: {summary}"
    );
    assert_eq!(summary["delivered"], 2);
    assert_eq!(summary["unreadable"], 1);
    assert!(
        summary["unreadable_ranges"][0]
            .as_str()
            .unwrap()
            .ends_with(":3: not a dead-letter line: missing field `seq` at line 1 column 23"),
        "{summary}"
    );
    let got = consume(&broker.addr, "from-dlq", 2);
    assert_eq!(got[&7]["headers"]["id"], "q-1");
    assert_eq!(
        got[&7]["headers"]["instance"], "node-b",
        "instance from DATA_DIR"
    );
    assert_eq!(
        serde_json::to_vec(&got[&7]["value"]).unwrap(),
        record(1).value
    );
    assert_eq!(got[&9]["key"], "t0");
    // `sluice consume` prints a non-JSON value as lossy text.
    assert_eq!(
        got[&9]["value"],
        String::from_utf8_lossy(&binary.value).as_ref()
    );
}

#[test]
fn undelivered_records_make_the_run_fail() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (copy, first, last) = quarantined_copy(&data);
    // Nothing listens on port 1: every record times out.
    let (out, summary) = redrive(&[
        "--brokers",
        "127.0.0.1:1",
        "--topic",
        "events",
        "--timeout-ms",
        "1500",
        "--segment",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{summary}");
    assert_eq!(summary["read"], last - first + 1);
    assert_eq!(summary["delivered"], 0);
    assert_eq!(summary["failed"], last - first + 1);
    assert!(
        summary["failures"][0]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{summary}"
    );
}
