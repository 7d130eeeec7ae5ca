//! The README flow with real processes: `sluice dev-broker`, `sluice serve
//! --brokers`, a POST, then `sluice consume` prints the event.

use std::process::Command;

use crate::support::{Broker, Daemon, EXE};

#[test]
fn dev_broker_serve_post_and_consume_as_processes() {
    let dir = tempfile::tempdir().unwrap();
    let exe = EXE;
    let broker = Broker::start(dir.path(), Some(2));
    let brokers = broker.addr.clone();
    let serve = Daemon::spawn(&dir.path().join("data"), Some(&brokers), &[]);
    let addr = serve.addr.clone();
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
    assert!(serve.stop().success());
    drop(broker);
}
