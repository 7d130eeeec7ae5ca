//! The daemon's life as systemd sees it, with real child processes: READY,
//! watchdog pings and STOPPING over $NOTIFY_SOCKET; SIGTERM finishing
//! in-flight requests, draining replay and flushing the offset; a second
//! signal exiting at once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_sluice");

fn wait_file(path: &Path) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s.trim().to_string();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every caller waits for the child.
#[allow(clippy::zombie_processes)]
fn serve(dir: &Path, brokers: &str, env: &[(&str, &str)]) -> (Child, String) {
    let _ = std::fs::remove_file(dir.join("addr"));
    let mut cmd = Command::new(EXE);
    // No admin listener: its fixed default port would clash between parallel daemons.
    cmd.env("SLUICE_HTTP_ADMIN_LISTEN", "");
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--brokers",
        brokers,
        "--data-dir",
    ])
    .arg(dir.join("data"))
    .arg("--addr-file")
    .arg(dir.join("addr"))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    (child, wait_file(&dir.join("addr")))
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(t0.elapsed() < within, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn systemd_sees_ready_watchdog_pings_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (mut child, _) = serve(
        dir.path(),
        "",
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "100000"),
        ],
    );
    let mut buf = [0u8; 512];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.contains("READY=1"), "{first}");
    let pings = (0..3)
        .map(|_| recv())
        .filter(|m| m.trim() == "WATCHDOG=1")
        .count();
    assert_eq!(pings, 3, "the watchdog pings while everything is alive");
    signal(&child, "TERM");
    let mut stopping = false;
    for _ in 0..20 {
        if recv().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 is sent when shutdown starts");
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}

#[test]
fn sigterm_finishes_in_flight_requests_drains_and_flushes_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Command::new(EXE)
        .args(["dev-broker", "--addr-file"])
        .arg(dir.path().join("broker"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let brokers = wait_file(&dir.path().join("broker"));
    let (mut child, addr) = serve(dir.path(), &brokers, &[]);

    // A request whose body is still arriving when SIGTERM comes.
    let body = r#"[{"id":"late-1","tenant_id":"a","source":"s","message":"m"},{"id":"late-2","tenant_id":"a","source":"s","message":"m"}]"#;
    let (head, tail) = body.split_at(40);
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(300));
    stream.write_all(tail.as_bytes()).unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 202"),
        "the in-flight request completes: {resp}"
    );
    assert!(resp.contains(r#""last_seq":2"#), "{resp}");
    assert!(
        wait_exit(&mut child, Duration::from_secs(30)).success(),
        "exit 0"
    );

    // Replay drained and the offset was flushed before exit.
    let out = Command::new(EXE)
        .args(["wal", "stats", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["committed"], 2, "{stats}");
    assert_eq!(stats["backlog_records"], 0);
    broker.kill().unwrap();
    broker.wait().unwrap();
}

#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Kafka unreachable and a long drain: the first SIGTERM would wait.
    let (mut child, addr) = serve(
        dir.path(),
        "127.0.0.1:1",
        &[("SLUICE_REPLAY_DRAIN_TIMEOUT_MS", "120000")],
    );
    let body = r#"{"tenant_id":"a","source":"s","message":"undeliverable"}"#;
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still draining after the first signal"
    );
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(3));
    assert_eq!(status.code(), Some(130));
    // Nothing acknowledged is lost: the record is still in the WAL.
    let out = Command::new(EXE)
        .args(["wal", "stats", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["last_seq"], 1);
    assert_eq!(stats["committed"], 0);
}
