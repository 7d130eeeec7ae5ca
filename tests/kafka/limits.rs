//! `limits.max-event-bytes` agrees with the producer's `message.max.bytes`:
//! an event the producer would refuse gets 413 at ingest, never a 202 and
//! then a dead letter; an event that fits reaches the topic.

use std::process::Command;

use sluice::config::Config;

use super::daemon::{consume_all, get_json, http, serve, wait_committed, Broker, EXE};

fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(EXE)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_refuses_an_event_limit_the_producer_cannot_carry() {
    // librdkafka's default message.max.bytes is 1,000,000.
    let (ok, err) = check_config("[limits]\nmax-event-bytes = 1010000\n");
    assert!(!ok, "{err}");
    assert!(
        err.contains("sluice.toml:2:") && err.contains("message.max.bytes"),
        "{err}"
    );
    // Raising the producer's limit makes the same value fit.
    let (ok, err) = check_config(
        "[limits]\nmax-event-bytes = 1010000\n[kafka.librdkafka]\n\"message.max.bytes\" = \"1100000\"\n",
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("effective limits.max-event-bytes: 1010000"),
        "{err}"
    );
    // Left at its default, the limit is lowered to what fits, and said so.
    let fit = Config::default().effective_max_event_bytes().unwrap();
    assert!(fit < 1_000_000, "{fit}");
    let (ok, err) = check_config("");
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("effective limits.max-event-bytes: {fit}")),
        "{err}"
    );
    // A passed-through limit too small for the key and headers is refused.
    let (ok, err) = check_config("[kafka.librdkafka]\n\"message.max.bytes\" = \"2000\"\n");
    assert!(!ok, "{err}");
}

/// One event whose normalized value is exactly `len` bytes.
fn event_of(id: &str, len: usize) -> Vec<u8> {
    let with = |m: usize| {
        serde_json::json!({"id": id, "tenant_id": "t", "timestamp": "2024-05-01T12:00:00Z",
            "severity": "INFO", "source": "s", "message": "x".repeat(m)})
    };
    let base = serde_json::to_vec(&with(0)).unwrap().len();
    serde_json::to_vec(&with(len - base)).unwrap()
}

#[test]
fn an_event_the_producer_would_refuse_gets_413_and_one_that_fits_is_delivered() {
    let fit = Config::default().effective_max_event_bytes().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), Some(1));
    let daemon = serve(&dir.path().join("data"), &broker.addr, &[], &[]);
    let post = |body: &[u8]| http(&daemon.addr, "POST", "/v1/events", "application/json", body);
    let (status, body) = post(&event_of("big-101", 1_010_000));
    assert_eq!(status, 413, "a 1.01 MB event: {body}");
    let (status, body) = post(&event_of("over-fit", fit + 1));
    assert_eq!(status, 413, "one byte over what the producer takes: {body}");
    let (status, body) = post(&event_of("at-fit", fit));
    assert_eq!(status, 202, "{body}");
    let seq = serde_json::from_str::<serde_json::Value>(&body).unwrap()["last_seq"]
        .as_u64()
        .unwrap();
    wait_committed(&daemon, seq);
    let stats = get_json(&daemon.addr, "/stats");
    assert_eq!(stats["replay"]["dead_lettered_topic"], 0, "{stats}");
    assert_eq!(stats["replay"]["dead_lettered_file"], 0, "{stats}");
    assert!(daemon.stop().success());
    let ids: Vec<String> = consume_all(&broker.addr, "events")
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, ["at-fit"]);
    assert!(!dir
        .path()
        .join("data/dead-letter/dead-letter.ndjson")
        .exists());
}
