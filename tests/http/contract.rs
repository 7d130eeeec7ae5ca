//! The HTTP contract as a client sees it: raw requests over TCP against a
//! real `sluice serve`, each answer checked against the README, and what was
//! stored read back from the WAL after the daemon is gone.

use std::io::Write;
use std::sync::Arc;

use serde_json::{json, Value};
use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{Record, Wal, WalConfig};

use super::daemon::{gzip, Daemon, Resp};
use super::wal_records;

const ND: (&str, &str) = ("Content-Type", "application/x-ndjson");
const CSVT: (&str, &str) = ("Content-Type", "text/csv");
const JS: (&str, &str) = ("Content-Type", "application/json");

/// Kills the daemon and returns every record its WAL holds.
fn stored(d: Daemon) -> Vec<Record> {
    let data = d.data_dir();
    let mut d = d;
    let _ = d.serve.child.kill();
    let _ = d.serve.child.wait();
    let wal = Wal::open(
        WalConfig::new(&data),
        Arc::new(StdFs) as Arc<dyn Filesystem>,
        0,
    )
    .unwrap()
    .0;
    let out = wal_records(&wal).into_iter().map(|(_, r)| r).collect();
    drop(wal);
    drop(d);
    out
}

fn value(r: &Record) -> Value {
    serde_json::from_slice(&r.value).unwrap()
}

fn event(msg: &str) -> String {
    json!({"tenant_id": "acme", "source": "web", "message": msg}).to_string()
}

/// A 4xx from anywhere in the stack has a JSON `{"error": "..."}` body.
fn assert_error_body(r: &Resp, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let msg = r.json()["error"].as_str().map(str::to_string);
    assert!(
        msg.as_deref().is_some_and(|m| !m.is_empty()),
        "{status} without an error body: {:?}",
        String::from_utf8_lossy(&r.body)
    );
}

#[test]
fn multi_member_gzip_stores_every_event_and_trailing_garbage_is_refused() {
    let d = Daemon::start("");
    let gz = ("Content-Encoding", "gzip");
    let mut body = gzip(format!("{}\n", event("a")).as_bytes());
    body.extend(gzip(format!("{}\n", event("b")).as_bytes()));
    let r = d.post("/v1/events", &[ND, gz], &body);
    assert_eq!(
        (r.status, r.json()["accepted"].clone()),
        (202, json!(2)),
        "{r:?}"
    );
    let mut csv = gzip(b"tenant_id,source,message\nacme,web,c\n");
    csv.extend(gzip(b"acme,web,d\n"));
    let r = d.post("/v1/events", &[CSVT, gz], &csv);
    assert_eq!(
        (r.status, r.json()["accepted"].clone()),
        (202, json!(2)),
        "{r:?}"
    );
    let mut arr = gzip(b"[");
    arr.extend(gzip(format!("{}]", event("e")).as_bytes()));
    let r = d.post("/v1/events", &[JS, gz], &arr);
    assert_eq!(r.status, 202, "{r:?}");

    let mut bad = gzip(format!("{}\n", event("never")).as_bytes());
    bad.extend_from_slice(b"trailing garbage");
    let r = d.post("/v1/events", &[ND, gz], &bad);
    assert_error_body(&r, 400);
    let msgs: Vec<Value> = stored(d)
        .iter()
        .map(|r| value(r)["message"].clone())
        .collect();
    assert_eq!(msgs, ["a", "b", "c", "d", "e"]);
}

#[test]
fn timestamps_follow_one_range_in_every_form() {
    let d = Daemon::start("");
    let post = |ts: Value| {
        let mut e: Value = serde_json::from_str(&event("t")).unwrap();
        e["timestamp"] = ts;
        d.post("/v1/events", &[JS], e.to_string().as_bytes())
    };
    for ts in [
        json!("9999-12-31T23:59:59-01:00"),
        json!("0000-01-01T00:00:00+01:00"),
        json!(253_402_300_800_000u64),
        // At or before the epoch, Kafka (through librdkafka) cannot carry
        // the event time: 0 means "now" and a negative one means none.
        json!(0),
        json!(-0.001),
        json!("1969-12-31T23:59:59Z"),
        json!("1970-01-01T00:00:00Z"),
    ] {
        let r = post(ts.clone());
        assert_eq!(r.status, 400, "{ts}: {r:?}");
        let err = r.json()["errors"][0]["error"].as_str().unwrap().to_string();
        assert!(err.contains("out of range"), "{ts}: {err}");
    }
    for ts in [
        json!("9999-12-31T23:59:59.999Z"),
        json!(0.001),
        json!("1e11"),
        json!(1e11),
    ] {
        assert_eq!(post(ts.clone()).status, 202, "{ts}");
    }
    let recs = stored(d);
    let times: Vec<(Value, i64)> = recs
        .iter()
        .map(|r| (value(r)["timestamp"].clone(), r.timestamp_ms))
        .collect();
    assert_eq!(
        times,
        [
            (json!("9999-12-31T23:59:59.999Z"), 253_402_300_799_999),
            (json!("1970-01-01T00:00:00.001Z"), 1),
            (json!("1973-03-03T09:46:40Z"), 100_000_000_000),
            (json!("1973-03-03T09:46:40Z"), 100_000_000_000),
        ]
    );
}

#[test]
fn csv_error_lines_are_physical_lines_for_every_line_ending() {
    let d = Daemon::start("");
    for eol in ["\n", "\r\n", "\r"] {
        // Line 1 header, 2 good, 3 blank, 4 no message, 5 good, 6 no source.
        let body = [
            "tenant_id,source,message",
            "acme,web,a",
            "",
            "acme,web,",
            "acme,web,b",
            "acme,,c",
            "",
        ]
        .join(eol);
        let r = d.post("/v1/events", &[CSVT], body.as_bytes());
        assert_eq!(r.status, 202, "{eol:?}: {r:?}");
        let lines: Vec<Value> = r.json()["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["line"].clone())
            .collect();
        assert_eq!(lines, [json!(4), json!(6)], "{eol:?}: {r:?}");
        assert_eq!(r.json()["accepted"], 2, "{eol:?}");
    }
}

#[test]
fn an_unterminated_csv_quote_is_an_error_not_a_message() {
    let d = Daemon::start("");
    let body = "tenant_id,source,message\nacme,web,ok\nacme,web,\"unterminated\nacme,web,next\n";
    let r = d.post("/v1/events", &[CSVT], body.as_bytes());
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json()["accepted"], 1, "{r:?}");
    let e = &r.json()["errors"][0];
    assert_eq!(e["line"], 3, "{r:?}");
    assert!(e["error"].as_str().unwrap().contains("quote"), "{r:?}");
    let msgs: Vec<Value> = stored(d)
        .iter()
        .map(|r| value(r)["message"].clone())
        .collect();
    assert_eq!(msgs, ["ok"]);
}

#[test]
fn one_very_deep_event_is_refused_alone_at_any_depth() {
    let d = Daemon::start("");
    for depth in [65, 129, 200, 100_000] {
        let deep = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let body = format!(
            r#"[{}, {{"tenant_id":"acme","source":"s","message":"m","x":{deep}}}]"#,
            event("ok")
        );
        let r = d.post("/v1/events", &[JS], body.as_bytes());
        assert_eq!(r.status, 202, "depth {depth}: {:?}", r.json()["error"]);
        assert_eq!(r.json()["accepted"], 1);
        assert_eq!(r.json()["errors"][0]["index"], 1);
        assert_eq!(
            r.json()["errors"][0]["error"],
            "event nesting is deeper than 64"
        );
        let nd = format!(
            "{}\n{{\"tenant_id\":\"acme\",\"source\":\"s\",\"message\":\"m\",\"x\":{deep}}}\n",
            event("ok")
        );
        let r = d.post("/v1/events", &[ND], nd.as_bytes());
        assert_eq!(r.json()["errors"][0]["line"], 2, "depth {depth}: {r:?}");
        assert_eq!(
            r.json()["errors"][0]["error"],
            "event nesting is deeper than 64"
        );
    }
}

#[test]
fn the_source_limit_counts_the_characters_sent() {
    let d = Daemon::start("");
    let ok = json!({"tenant_id": "acme", "source": "İ".repeat(256), "message": "m"});
    let r = d.post("/v1/events", &[JS], ok.to_string().as_bytes());
    assert_eq!(r.status, 202, "{r:?}");
    let long = json!({"tenant_id": "acme", "source": "İ".repeat(257), "message": "m"});
    let r = d.post("/v1/events", &[JS], long.to_string().as_bytes());
    assert_eq!(r.status, 400, "{r:?}");
}

#[test]
fn every_4xx_from_the_http_layer_has_an_error_body() {
    let d = Daemon::start("");
    let e = event("x");
    let r = d.post(
        "/v1/events",
        &[JS, ("Content-Encoding", "br")],
        e.as_bytes(),
    );
    assert_error_body(&r, 415);
    assert_error_body(&d.get("/nope"), 404);
    assert_error_body(&d.get("/v1/events"), 405);
    assert_error_body(&d.raw(b"BLAH\r\n\r\n"), 400);
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(100_000)
    );
    let r = d.raw(long_uri.as_bytes());
    assert!(r.status == 414 || r.status == 431, "{r:?}");
    assert_error_body(&r, r.status);
    let r = d.post(
        "/v1/events",
        &[JS, ("X-Big", &"b".repeat(200_000))],
        e.as_bytes(),
    );
    assert_error_body(&r, 431);
}

#[test]
fn content_codings_match_case_insensitively_and_across_header_lines() {
    let d = Daemon::start("");
    let body = gzip(event("g").as_bytes());
    let r = d.post("/v1/events", &[JS, ("Content-Encoding", "GZIP")], &body);
    assert_eq!(r.status, 202, "{r:?}");
    // gzip then br on two lines is the list "gzip, br": br is unknown.
    let r = d.post(
        "/v1/events",
        &[JS, ("Content-Encoding", "gzip"), ("Content-Encoding", "br")],
        &body,
    );
    assert_error_body(&r, 415);
    let r = d.post("/v1/events", &[JS, ("Content-Encoding", "gzip, br")], &body);
    assert_error_body(&r, 415);
    // Two real codings, applied in order: gzip, then zstd.
    let both = zstd::encode_all(&body[..], 0).unwrap();
    let r = d.post(
        "/v1/events",
        &[
            JS,
            ("Content-Encoding", "gzip"),
            ("Content-Encoding", "zstd"),
        ],
        &both,
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(stored(d).len(), 2);
}

#[test]
fn max_header_bytes_means_what_it_says() {
    let d = Daemon::start("[http]\nmax-header-bytes = 65536\n");
    let e = event("h");
    let head_of = |pad: usize| {
        let base = format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/json\r\nX-Pad: \r\n\r\n",
            e.len()
        );
        base.len() + pad
    };
    let pad = 65536 - head_of(0);
    assert_eq!(head_of(pad), 65536);
    let r = d.post(
        "/v1/events",
        &[JS, ("X-Pad", &"p".repeat(pad))],
        e.as_bytes(),
    );
    assert_eq!(r.status, 202, "a head of exactly the limit: {r:?}");
    let r = d.post(
        "/v1/events",
        &[JS, ("X-Pad", &"p".repeat(pad + 1))],
        e.as_bytes(),
    );
    assert_error_body(&r, 431);
    let r = d.post(
        "/v1/events",
        &[JS, ("X-Pad", &"p".repeat(100_000))],
        e.as_bytes(),
    );
    assert_error_body(&r, 431);
    // The documented count limit.
    let many: Vec<(String, String)> = (0..101).map(|i| (format!("X-H{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = d.post("/v1/events", &many, e.as_bytes());
    assert_error_body(&r, 431);
    // Every path, an unknown one or a known one with the wrong method too.
    let r = d.post("/no/such/path", &[("X-Pad", &"p".repeat(66_000))], b"{}");
    assert_error_body(&r, 431);
    let r = d.post("/health", &[("X-Pad", &"p".repeat(66_000))], b"{}");
    assert_error_body(&r, 431);
    let r = d.post("/no/such/path", &[], b"{}");
    assert_eq!(r.status, 404, "{r:?}");
    // Heads sluice refused on a route are counted under it (the 100,000-byte
    // one and the 101 headers are refused by the HTTP parser before routing).
    assert_eq!(
        d.metric(r#"sluice_http_requests_total{route="/v1/events",status="431"}"#),
        2.0
    );
    assert_eq!(
        d.metric(r#"sluice_http_requests_total{route="/v1/events",status="202"}"#),
        1.0
    );
}

#[test]
fn shedding_logs_once_per_state_change_and_is_counted() {
    let d = Daemon::start(
        "[limits]\nmax-body-bytes = 100000\nmax-inflight-bytes = 100000\nmax-event-bytes = 100000\n",
    );
    // One client holds most of the budget with a body it has not finished.
    let mut hog = std::net::TcpStream::connect(d.addr).unwrap();
    hog.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
    )
    .unwrap();
    hog.write_all(&[b' '; 90_000]).unwrap();
    hog.flush().unwrap();
    let t0 = std::time::Instant::now();
    while d.metric("sluice_inflight_body_bytes") < 90_000.0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "hog not held"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let big = format!("[{}]", vec![event("s"); 300].join(","));
    assert!(big.len() > 10_000);
    let mut shed = 0;
    let t0 = std::time::Instant::now();
    while shed < 5 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "never shed: {}",
            String::from_utf8_lossy(&d.get("/metrics").body)
                .lines()
                .filter(|l| l.contains("inflight"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let r = d.post("/v1/events", &[JS], big.as_bytes());
        match r.status {
            503 => shed += 1,
            202 => {}
            _ => panic!("{r:?}"),
        }
    }
    drop(hog);
    let t0 = std::time::Instant::now();
    while d.post("/v1/events", &[JS], big.as_bytes()).status != 202 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "never recovered"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(d.metric("sluice_requests_shed_total") >= 5.0);
    let log = d.log();
    assert!(!log.contains("ERROR"), "{log}");
    assert_eq!(log.matches("shedding").count(), 1, "{log}");
    assert_eq!(log.matches("shedding cleared").count(), 0, "{log}");
}

#[test]
fn empty_bodies_say_what_was_wrong() {
    let d = Daemon::start("");
    let r = d.post("/v1/events", &[CSVT], b"tenant_id,source,message\n");
    assert_error_body(&r, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("no data rows"),
        "{r:?}"
    );
    let r = d.post("/v1/events", &[CSVT], event("j").as_bytes());
    assert_error_body(&r, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("JSON"),
        "{r:?}"
    );
}

#[test]
fn unknown_fields_keep_their_numbers_as_sent() {
    let d = Daemon::start("");
    let body = r#"{"tenant_id":"acme","source":"s","message":"m","n":1e5,"f":1.50}"#;
    assert_eq!(d.post("/v1/events", &[JS], body.as_bytes()).status, 202);
    let v = String::from_utf8(stored(d)[0].value.clone()).unwrap();
    assert!(v.ends_with(r#""n":1e5,"f":1.50}"#), "{v}");
}
