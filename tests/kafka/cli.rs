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
    let resp = post_json(&addr, body);
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

/// Threads of `pid` by name, with their nice values (`ps -L -o comm,ni`).
fn thread_nice(pid: &str) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // After "(comm) ": state is field 3, nice is field 19.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let nice: i64 = rest.split(' ').nth(16).unwrap().parse().unwrap();
        out.push((comm.trim().to_string(), nice));
    }
    out
}

#[test]
fn replay_and_librdkafka_threads_run_below_ingest_priority() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), Some(1));
    for (nice, env) in [
        (10, vec![]),
        (0, vec![("SLUICE_REPLAY_NICE", "0")]),
        (15, vec![("SLUICE_REPLAY_NICE", "15")]),
    ] {
        let data = dir.path().join(format!("data-{nice}"));
        let serve = Daemon::spawn(&data, Some(&broker.addr), &env);
        // One delivered event: the producer and its threads exist.
        let body = r#"{"tenant_id":"acme","source":"web","message":"hello"}"#;
        let resp = post_json(&serve.addr, body);
        assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let threads = loop {
            let t = thread_nice(&serve.pid());
            if t.iter().any(|(c, _)| c.starts_with("rdk:broker"))
                || std::time::Instant::now() > deadline
            {
                break t;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let of = |prefix: &str| -> Vec<i64> {
            threads
                .iter()
                .filter(|(c, _)| c.starts_with(prefix))
                .map(|(_, n)| *n)
                .collect()
        };
        // Relative to the priority sluice started with (this test may run
        // under `nice`).
        let base = of("sluice-wal-writ")[0];
        let want = (base + nice).min(19);
        // (A thread librdkafka is starting carries its creator's name
        // until it names itself.)
        assert!(
            !of("sluice-replay").is_empty() && of("sluice-replay").iter().all(|&n| n == want),
            "{threads:?}"
        );
        assert!(
            !of("rdk:").is_empty() && of("rdk:").iter().all(|&n| n == want),
            "{threads:?}"
        );
        assert!(
            of("producer pollin").iter().all(|&n| n == want),
            "{threads:?}"
        );
        // Ingest keeps the priority sluice started with.
        assert!(!of("tokio-rt-worker").is_empty(), "{threads:?}");
        assert!(
            of("tokio-rt-worker").iter().all(|&n| n == base),
            "{threads:?}"
        );
        assert!(serve.stop().success());
    }
    // Only lower, never higher, than ingest's priority.
    let config = dir.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let out = Command::new(EXE)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .env("SLUICE_REPLAY_NICE", "20")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replay.nice"),
        "{out:?}"
    );
}

/// One JSON body to /v1/events on a fresh connection; the raw response.
fn post_json(addr: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    resp
}

/// `sluice wal dump` and `sluice consume` show the stored bytes: `1e5` and
/// `\u00e9` as the client sent them (not re-serialized as `1e+5` and `é`),
/// and a binary header as base64, not replacement characters.
#[test]
fn the_tools_print_the_stored_bytes() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let body =
        r#"{"id":"raw-1","tenant_id":"acme","source":"web","message":"m","x":1e5,"y":"caf\u00e9"}"#;
    // Kafka unreachable: the record stays in the WAL for `wal dump`.
    let serve = Daemon::spawn(&data, Some("127.0.0.1:1"), &[]);
    let mut s = std::net::TcpStream::connect(&serve.addr).unwrap();
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: \"k-1\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    assert!(serve.stop().success());

    let out = Command::new(EXE)
        .args(["wal", "dump", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_value_as_sent(&text);
    assert!(
        !text.contains('\u{fffd}'),
        "a binary header as replacement characters: {text}"
    );
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(
        line["headers"][":sluice.idempotency"]["base64"].is_string(),
        "{line}"
    );

    let broker = Broker::start(dir.path(), Some(1));
    let serve = Daemon::spawn(&data, Some(&broker.addr), &[]);
    let out = Command::new(EXE)
        .args(["consume", "--brokers", &broker.addr, "--topic", "events"])
        .args(["--from-beginning", "--max", "1", "--timeout", "20"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_value_as_sent(&text);
    assert!(serve.stop().success());
}

/// The value's number and escape exactly as the client sent them.
fn assert_value_as_sent(text: &str) {
    assert!(text.contains(r#""x":1e5"#), "{text}");
    assert!(text.contains(r#""y":"caf\u00e9""#), "{text}");
}
