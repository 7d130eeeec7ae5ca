//! Streams at the HTTP layer, over a real WAL: each route writes its own
//! stream into the records, validates with its own schema, takes only its
//! allowed tenants, has its own rate limits, and scopes Idempotency-Key.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;
use sluice::streams::StreamConfig;

use super::{harness, harness_with, Harness, Reply};

fn stream(name: &str, route: &str) -> StreamConfig {
    StreamConfig {
        name: name.into(),
        routes: vec![route.into()],
        topic: name.into(),
        dead_letter_topic: format!("{name}-dlq"),
        required: Vec::new(),
        key_field: "tenant_id".into(),
        allowed_tenants: Vec::new(),
        response_success_field: false,
        severity_aliases: Default::default(),
        requests_per_sec: 0,
        requests_burst: 0,
        events_per_sec: 0,
        events_burst: 0,
    }
}

async fn post(h: &Harness, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    h.send(req.body(Body::from(body.to_string())).unwrap())
        .await
}

#[tokio::test]
async fn each_route_writes_its_stream_and_validates_with_its_schema() {
    let h = harness_with(
        |c| {
            let mut clicks = stream("clicks", "/events");
            clicks.required = vec!["type".into()];
            clicks.key_field = "type".into();
            c.streams = vec![clicks];
        },
        std::sync::Arc::new(sluice::wal::io::StdFs),
    );
    // The default stream keeps its schema on its remaining routes.
    let r = post(&h, "/v1/events", &[], r#"{"type":"click"}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.json);
    assert!(r.json["errors"][0]["error"]
        .as_str()
        .unwrap()
        .contains("tenant_id"));
    let r = post(&h, "/ingest", &[], &super::ev("acme", "m").to_string()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // The stream's own schema on its route.
    let r = post(&h, "/events", &[], r#"{"payload":{}}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json["errors"][0]["error"]
        .as_str()
        .unwrap()
        .contains("type"));
    let r = post(
        &h,
        "/events",
        &[],
        r#"{"type":"click","payload":{"user_id":123}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let recs = h.wal_records();
    let streams: Vec<(&str, Option<&[u8]>)> = recs
        .iter()
        .map(|(_, r)| (r.stream.as_str(), r.key.as_deref()))
        .collect();
    assert_eq!(
        streams,
        [
            ("default", Some(&b"acme"[..])),
            ("clicks", Some(&b"click"[..]))
        ]
    );
}

#[tokio::test]
async fn allowed_tenants_refuse_others_and_untenanted_events() {
    let h = harness_with(
        |c| {
            let mut s = stream("billing", "/billing");
            s.allowed_tenants = vec!["acme".into()];
            c.streams = vec![s];
        },
        std::sync::Arc::new(sluice::wal::io::StdFs),
    );
    let body = json!([
        {"tenant_id": "acme", "message": "ok"},
        {"tenant_id": "globex", "message": "no"},
        {"message": "none"}
    ]);
    let r = post(&h, "/billing", &[], &body.to_string()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    assert_eq!(r.json["accepted"], 1);
    let errors: Vec<&str> = r.json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap())
        .collect();
    assert_eq!(
        errors,
        [
            "stream \"billing\" does not take tenant_id \"globex\"",
            "stream \"billing\" does not take events without a tenant_id"
        ]
    );
    let r = post(&h, "/billing", &[], r#"{"tenant_id":"globex"}"#).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "all refused: 403");
    // The default stream is not restricted.
    let r = post(&h, "/v1/events", &[], &super::ev("globex", "m").to_string()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_stream_rate_limit_answers_429_and_413_on_that_stream_only() {
    let h = harness_with(
        |c| {
            let mut s = stream("slow", "/slow");
            s.events_per_sec = 1;
            s.events_burst = 2;
            c.streams = vec![s];
        },
        std::sync::Arc::new(sluice::wal::io::StdFs),
    );
    let two = json!([{"tenant_id": "a"}, {"tenant_id": "a"}]).to_string();
    let r = post(&h, "/slow", &[], &two).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = post(&h, "/slow", &[], &two).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.json);
    assert!(r.retry_after.is_some());
    assert!(r.json["error"]
        .as_str()
        .unwrap()
        .contains("stream \"slow\""));
    let three = json!([{"tenant_id": "a"}, {"tenant_id": "a"}, {"tenant_id": "a"}]).to_string();
    let r = post(&h, "/slow", &[], &three).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "over the burst");
    // Other streams are not limited by it.
    for _ in 0..3 {
        let r = post(&h, "/v1/events", &[], &super::ev("a", "m").to_string()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
    }
}

#[tokio::test]
async fn an_idempotency_key_is_scoped_per_stream() {
    let h = harness_with(
        |c| c.streams = vec![stream("other", "/other")],
        std::sync::Arc::new(sluice::wal::io::StdFs),
    );
    let key = [("Idempotency-Key", "\"k-1\"")];
    let body = super::ev("acme", "m").to_string();
    let a = post(&h, "/v1/events", &key, &body).await;
    let b = post(&h, "/other", &key, &body).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_ne!(
        a.json["first_seq"], b.json["first_seq"],
        "two requests, two records"
    );
    // A retry on each stream replays that stream's answer.
    let a2 = post(&h, "/v1/events", &key, &body).await;
    let b2 = post(&h, "/other", &key, &body).await;
    assert_eq!(a2.json["first_seq"], a.json["first_seq"]);
    assert_eq!(b2.json["first_seq"], b.json["first_seq"]);
    let streams: Vec<String> = h.wal_records().into_iter().map(|(_, r)| r.stream).collect();
    assert_eq!(streams, ["default", "other"]);
}

#[tokio::test]
async fn without_streams_every_builtin_path_is_the_default_stream() {
    let h = harness();
    for path in sluice::streams::INGEST_PATHS {
        let r = post(&h, path, &[], &super::ev("acme", path).to_string()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{path}");
    }
    assert!(h.wal_records().iter().all(|(_, r)| r.stream == "default"));
}
