//! One test per status code and error class, partial success, receipts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;
use sluice::wal::io::{Fault, FaultKind, SimFs, StdFs};

use super::{ev, harness, harness_with, CSV, JSON};

#[tokio::test]
async fn partial_success_reports_exact_indexes_ids_and_messages() {
    let h = harness();
    let body = json!([
        ev("a", "ok-0"),
        {"id": "bad-tenant", "tenant_id": "no spaces", "source": "s", "message": "m"},
        ev("a", "ok-2"),
        {"id": "bad-sev", "tenant_id": "a", "source": "s", "message": "m", "severity": "LOUD"},
        "not an object",
        {"tenant_id": "a", "message": "no source"},
        ev("a", "ok-6"),
    ]);
    let r = h.post(JSON, body.to_string()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        r.json,
        json!({
            "accepted": 3, "rejected": 4,
            "errors": [
                {"index": 1, "id": "bad-tenant", "error": "tenant_id must match [A-Za-z0-9._-]{1,64}"},
                {"index": 3, "id": "bad-sev", "error": "severity must be one of TRACE, DEBUG, INFO, WARN, WARNING, ERROR, FATAL"},
                {"index": 4, "id": null, "error": "event must be a JSON object"},
                {"index": 5, "id": null, "error": "missing required field \"source\""},
            ],
            "first_seq": 1, "last_seq": 3,
        })
    );
    let msgs: Vec<_> = h
        .wal_records()
        .iter()
        .map(|(s, r)| (*s, super::value(r)["message"].clone()))
        .collect();
    assert_eq!(
        msgs,
        [(1, json!("ok-0")), (2, json!("ok-2")), (3, json!("ok-6"))]
    );
}

#[tokio::test]
async fn all_invalid_is_400_with_the_same_shape() {
    let h = harness();
    let r = h.post(JSON, json!([{"x": 1}]).to_string()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["accepted"], 0);
    assert_eq!(r.json["first_seq"], json!(null));
    assert_eq!(
        r.json["errors"][0]["error"],
        "missing required field \"tenant_id\""
    );
    let r = h.post(JSON, "{nope").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json["error"]
        .as_str()
        .unwrap()
        .starts_with("body is not valid JSON"));
    let r = h.post(JSON, "42").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(h.wal_records().is_empty());
}

#[tokio::test]
async fn required_fields_are_configurable() {
    let h = harness_with(
        |c| c.events.required = vec!["message".into()],
        Arc::new(StdFs),
    );
    let r = h
        .post(JSON, json!({"message": "only this"}).to_string())
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let v = super::value(&h.wal_records()[0].1);
    assert_eq!(v["severity"], "INFO");
    assert!(v.get("tenant_id").is_none());
}

#[tokio::test]
async fn too_large_body_event_and_event_count_are_413() {
    let h = harness_with(
        |c| {
            c.limits.max_body_bytes = 4096;
            c.limits.max_event_bytes = 1024;
            c.limits.max_inflight_bytes = 1 << 20;
            c.limits.max_events_per_request = 3;
        },
        Arc::new(StdFs),
    );
    let r = h.post(JSON, format!("[{}]", " ".repeat(5000))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json["error"],
        "body exceeds 4096 bytes (after decompression)"
    );
    // Same without Content-Length (chunked): cut while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b' '; 1000])).collect();
    let r = h
        .post(JSON, Body::from_stream(futures_util::stream::iter(chunks)))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // One event over max-event-bytes alone: 413.
    let r = h.post(JSON, ev("a", &"x".repeat(2000)).to_string()).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.json["errors"][0]["error"]
        .as_str()
        .unwrap()
        .contains("limit is 1024"));
    // Beside a good one: partial success.
    let r = h
        .post(
            JSON,
            json!([ev("a", &"x".repeat(2000)), ev("a", "small")]).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json["rejected"], 1);
    let r = h
        .post(
            JSON,
            json!([ev("a", "1"), ev("a", "2"), ev("a", "3"), ev("a", "4")]).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json["error"],
        "too many events: more than 3 in one request"
    );
    let r = h
        .post(
            CSV,
            "tenant_id,source,message\na,s,1\na,s,2\na,s,3\na,s,4\n",
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn unsupported_media_types_are_415() {
    let h = harness();
    for ct in [
        "text/xml",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin1",
    ] {
        let r = h.post(Some(ct), ev("a", "m").to_string()).await;
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        assert!(r.json["error"].as_str().is_some());
    }
    let r = h
        .post(
            Some("application/json; charset=UTF-8"),
            ev("a", "m").to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn wal_full_is_503_with_retry_after_and_nothing_written() {
    let h = harness_with(
        |c| {
            c.wal.segment_bytes = 4096;
            c.wal.max_bytes = 8192;
            c.limits.max_event_bytes = 512;
        },
        Arc::new(StdFs),
    );
    let mut accepted = 0;
    let get = || Request::get("/ready").body(Body::empty()).unwrap();
    assert_eq!(h.send(get()).await.status, StatusCode::OK);
    let r = loop {
        let r = h
            .post(JSON, json!([ev("a", &"x".repeat(300))]).to_string())
            .await;
        if r.status != StatusCode::ACCEPTED {
            break r;
        }
        accepted += 1;
    };
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    assert!(r.json["error"].as_str().unwrap().starts_with("WAL is full"));
    assert_eq!(h.wal_records().len(), accepted);
    assert!(h.state.wal.failure().is_none(), "full is not a failure");
    let ready = h.send(get()).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        ready.json
    );
    assert!(ready.json["reasons"][0]
        .as_str()
        .unwrap()
        .starts_with("WAL at quota"));
    // Replay catches up and GC frees space: ready again with no client traffic.
    h.state.wal.remove_through(u64::MAX).unwrap();
    assert_eq!(h.send(get()).await.status, StatusCode::OK);
}

#[tokio::test]
async fn failed_fsync_is_503_sticky_and_asks_the_process_to_exit() {
    let fs = SimFs::new();
    let h = harness_with(|_| {}, Arc::new(fs.clone()));
    assert_eq!(
        h.post(JSON, ev("a", "before").to_string()).await.status,
        StatusCode::ACCEPTED
    );
    fs.inject(Fault::Sync(FaultKind::Io));
    let notified = h.state.fatal.notified();
    let r = h.post(JSON, ev("a", "lost").to_string()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    assert_eq!(
        r.json["error"], "storage failure; retry after restart or on another instance",
        "no internals leak to the client"
    );
    tokio::time::timeout(std::time::Duration::from_secs(1), notified)
        .await
        .expect("fatal notified");
    let r = h.post(JSON, ev("a", "after").to_string()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "sticky");
    let ready = h
        .send(Request::get("/ready").body(Body::empty()).unwrap())
        .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.json["reasons"][0]
        .as_str()
        .unwrap()
        .starts_with("WAL failed"));
}

#[tokio::test]
async fn disk_low_is_503() {
    let fs = SimFs::new();
    let h = harness_with(|c| c.wal.min_free_bytes = 1 << 20, Arc::new(fs.clone()));
    fs.set_capacity(fs.used_bytes() + (1 << 20) - 10);
    let r = h.post(JSON, ev("a", &"x".repeat(500)).to_string()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.json["error"]
        .as_str()
        .unwrap()
        .starts_with("disk space low"));
    let ready = h
        .send(Request::get("/ready").body(Body::empty()).unwrap())
        .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn shutting_down_is_503_with_retry_after() {
    let h = harness();
    h.state.shutting_down.store(true, Ordering::Relaxed);
    let r = h.post(JSON, ev("a", "late").to_string()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    assert!(h.wal_records().is_empty());
}

#[tokio::test]
async fn inflight_byte_budget_refuses_fast_instead_of_queueing() {
    let h = harness_with(
        |c| {
            c.limits.max_body_bytes = 64 * 1024;
            c.limits.max_event_bytes = 16 * 1024;
            c.limits.max_inflight_bytes = 64 * 1024;
        },
        Arc::new(StdFs),
    );
    // Another request holds almost the whole budget.
    let held = h
        .state
        .inflight
        .clone()
        .try_acquire_many_owned(60 * 1024)
        .unwrap();
    let body = json!([ev("a", &"x".repeat(8 * 1024))]).to_string();
    let r = h.post(JSON, body.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    drop(held);
    assert_eq!(h.post(JSON, body).await.status, StatusCode::ACCEPTED);
    assert_eq!(
        h.state.inflight.available_permits(),
        64 * 1024,
        "permits returned"
    );
}

#[tokio::test]
async fn large_bodies_wait_for_the_parsing_budget_small_ones_do_not() {
    let h = harness_with(|c| c.limits.max_parsing_bytes = 256 * 1024, Arc::new(StdFs));
    // Other large requests hold the whole parsing budget.
    let held = h
        .state
        .parsing
        .clone()
        .try_acquire_many_owned(256 * 1024)
        .unwrap();
    let events: Vec<_> = (0..100)
        .map(|i| ev("a", &format!("{i} {}", "x".repeat(1000))))
        .collect();
    let large = json!(events).to_string();
    assert!(large.len() > 64 * 1024);
    let waiting = h.send(
        Request::post("/v1/events")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, large.len())
            .body(Body::from(large))
            .unwrap(),
    );
    tokio::pin!(waiting);
    // It cannot finish while the budget is taken: it waits, it is not refused.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a large body must wait for the parsing budget"
    );
    assert!(h.wal_records().is_empty());
    // A single event with its length declared is not held back by large
    // ones (one without Content-Length counts as 1 MiB and would wait).
    let small = ev("b", "small").to_string();
    let r = h
        .send(
            Request::post("/v1/events")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, small.len())
                .body(Body::from(small))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    drop(held);
    assert_eq!(waiting.await.status, StatusCode::ACCEPTED);
    assert_eq!(h.wal_records().len(), 101);
    assert_eq!(
        h.state.parsing.available_permits(),
        256 * 1024,
        "permits returned"
    );
}

#[tokio::test]
async fn aliases_accept_like_the_canonical_path() {
    let h = harness();
    for path in ["/ingest", "/events", "/logs"] {
        let r = h
            .send(
                Request::post(path)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(ev("a", path).to_string()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{path}");
    }
    assert_eq!(h.wal_records().len(), 3);
}

#[tokio::test]
async fn receipts_health_ready() {
    let h = harness();
    let r = h
        .post(JSON, json!([ev("a", "1"), ev("a", "2")]).to_string())
        .await;
    assert_eq!(r.json["last_seq"], 2);
    let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    let r = h.send(get("/v1/receipts/2")).await;
    assert_eq!(
        r.json,
        json!({"seq": 2, "durable": true, "delivered": false, "status": "pending"})
    );
    h.state.offsets.commit(1).unwrap();
    let r = h.send(get("/v1/receipts/1")).await;
    assert_eq!(
        r.json,
        json!({"seq": 1, "durable": true, "delivered": true, "status": "delivered"})
    );
    let r = h.send(get("/v1/receipts/3")).await;
    assert_eq!(
        r.json,
        json!({"seq": 3, "durable": false, "delivered": false, "status": "unknown"})
    );
    // What replay records for numbers that did not reach the topic.
    use sluice::replay::offsets::Fate;
    h.state.offsets.record_fate(1, 1, Fate::Lost).unwrap();
    h.state
        .offsets
        .record_fate(2, 2, Fate::DeadLetteredFile)
        .unwrap();
    h.state.offsets.commit(2).unwrap();
    let r = h.send(get("/v1/receipts/1")).await;
    assert_eq!(
        r.json,
        json!({"seq": 1, "durable": false, "delivered": false, "status": "lost"})
    );
    let r = h.send(get("/v1/receipts/2")).await;
    assert_eq!(
        r.json,
        json!({"seq": 2, "durable": true, "delivered": false, "status": "dead_lettered", "dead_letter": "file"})
    );
    for bad in ["/v1/receipts/0", "/v1/receipts/abc", "/v1/receipts/-1"] {
        assert_eq!(
            h.send(get(bad)).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    assert_eq!(h.send(get("/health")).await.json, json!({"status": "ok"}));
    let r = h.send(get("/ready")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["ready"], true);
    let r = h.send(get("/stats")).await;
    assert_eq!(r.json["ingest"]["events_accepted"], 2);
    assert_eq!(r.json["wal"]["next_seq"], 3);
}
