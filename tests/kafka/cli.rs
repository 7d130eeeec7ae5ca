//! The README flow with real processes: `sluice dev-broker`, `sluice serve
//! --brokers`, a POST, then `sluice consume` prints the event.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for_file(path: &std::path::Path) -> String {
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dev_broker_serve_post_and_consume_as_processes() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_sluice");
    let mut broker = Command::new(exe)
        .args(["dev-broker", "--partitions", "2", "--addr-file"])
        .arg(dir.path().join("broker"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let brokers = wait_for_file(&dir.path().join("broker"));
    let mut serve = Command::new(exe)
        // No admin listener: its fixed default port would clash between parallel daemons.
        .env("SLUICE_HTTP_ADMIN_LISTEN", "")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--brokers",
            &brokers,
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--addr-file")
        .arg(dir.path().join("addr"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = wait_for_file(&dir.path().join("addr"));
    let body = r#"{"id":"readme-1","tenant_id":"acme","source":"web","message":"hello"}"#;
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");

    let out = Command::new(exe)
        .args([
            "consume",
            "--brokers",
            &brokers,
            "--topic",
            "events",
            "--from-beginning",
        ])
        .args(["--max", "1", "--timeout", "20"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let line: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["headers"]["id"], "readme-1");
    assert_eq!(line["key"], "acme");
    assert_eq!(line["value"]["message"], "hello");
    assert_eq!(line["headers"]["seq"], "1");

    // SIGTERM: clean exit 0 after draining.
    Command::new("kill")
        .arg(serve.id().to_string())
        .status()
        .unwrap();
    assert!(serve.wait().unwrap().success());
    broker.kill().unwrap();
    broker.wait().unwrap();
}
