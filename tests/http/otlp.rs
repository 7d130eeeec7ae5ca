//! `POST /v1/logs` (OTLP/HTTP logs) through `app(state)` over a real WAL:
//! each encoding, the record-to-event mapping field by field, partial
//! success, the statuses and error bodies OTLP exporters act on, and bodies
//! shaped to cost memory, on a real daemon's peak RSS.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{harness, harness_with, value, Harness};

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";
/// 2024-05-01T12:00:00.123456789Z
const T1: u64 = 1_714_564_800_123_456_789;
const TRACE: [u8; 16] = [
    0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f, 0xc6, 0x0c,
];
const SPAN: [u8; 8] = [0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74];

fn s(v: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(v.into())),
    })
}

fn kv(k: &str, v: Option<AnyValue>) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: v,
    }
}

fn int(i: i64) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    })
}

fn resource(attrs: Vec<KeyValue>, scope_logs: Vec<ScopeLogs>) -> ResourceLogs {
    ResourceLogs {
        resource: Some(Resource {
            attributes: attrs,
            ..Default::default()
        }),
        scope_logs,
        schema_url: String::new(),
    }
}

fn scope(records: Vec<LogRecord>) -> ScopeLogs {
    ScopeLogs {
        scope: Some(InstrumentationScope {
            name: "checkout.payments".into(),
            version: "1.2.3".into(),
            attributes: vec![kv("lib", s("x"))],
            dropped_attributes_count: 0,
        }),
        log_records: records,
        schema_url: String::new(),
    }
}

fn service(tenant: &str) -> Vec<KeyValue> {
    vec![
        kv("service.name", s("Checkout")),
        kv("tenant.id", s(tenant)),
        kv("host.name", s("web-1")),
    ]
}

/// Three records: a string body with every field, a map body with only an
/// observed time and a severity text, and a bare record.
fn three_records() -> ExportLogsServiceRequest {
    let full = LogRecord {
        time_unix_nano: T1,
        observed_time_unix_nano: T1 + 5_000_000,
        severity_number: 17,
        severity_text: "Error".into(),
        body: s("  payment declined "),
        attributes: vec![kv("order.id", int(42)), kv("retry", s("no"))],
        flags: 1,
        trace_id: TRACE.to_vec(),
        span_id: SPAN.to_vec(),
        ..Default::default()
    };
    let map_body = LogRecord {
        observed_time_unix_nano: T1,
        severity_text: "warning".into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::KvlistValue(KeyValueList {
                values: vec![
                    kv("code", int(7)),
                    kv(
                        "tags",
                        Some(AnyValue {
                            value: Some(any_value::Value::ArrayValue(ArrayValue {
                                values: vec![s("a").unwrap(), int(1).unwrap()],
                            })),
                        }),
                    ),
                ],
            })),
        }),
        ..Default::default()
    };
    let bare = LogRecord {
        body: s("bare"),
        ..Default::default()
    };
    ExportLogsServiceRequest {
        resource_logs: vec![resource(
            service("acme"),
            vec![scope(vec![full, map_body, bare])],
        )],
    }
}

pub struct OtlpReply {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub replayed: Option<String>,
    pub body: Vec<u8>,
}

impl OtlpReply {
    fn response(&self) -> ExportLogsServiceResponse {
        assert_eq!(self.content_type.as_deref(), Some(PROTOBUF));
        ExportLogsServiceResponse::decode(&self.body[..]).unwrap()
    }

    /// The google.rpc.Status message of a protobuf error body.
    fn status_message(&self) -> String {
        assert_eq!(self.content_type.as_deref(), Some(PROTOBUF));
        tonic_types::Status::decode(&self.body[..]).unwrap().message
    }

    fn json(&self) -> Value {
        assert_eq!(self.content_type.as_deref(), Some(JSON));
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn send(h: &Harness, headers: &[(&str, &str)], body: Vec<u8>) -> OtlpReply {
    send_to(h, "/v1/logs", headers, body).await
}

async fn send_to(h: &Harness, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> OtlpReply {
    let mut req = Request::post(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = h
        .app()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let get = |n| {
        resp.headers()
            .get(n)
            .map(|v: &header::HeaderValue| v.to_str().unwrap().to_string())
    };
    let (content_type, retry_after) = (get(header::CONTENT_TYPE), get(header::RETRY_AFTER));
    let replayed = get(header::HeaderName::from_static("idempotent-replayed"));
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    OtlpReply {
        status,
        content_type,
        retry_after,
        replayed,
        body,
    }
}

async fn post_proto(h: &Harness, req: &ExportLogsServiceRequest) -> OtlpReply {
    send(h, &[("content-type", PROTOBUF)], req.encode_to_vec()).await
}

fn events(h: &Harness) -> Vec<Value> {
    h.wal_records().iter().map(|(_, r)| value(r)).collect()
}

/// What the three records must become, whichever encoding carried them.
fn check_three(h: &Harness) {
    let recs = h.wal_records();
    assert_eq!(recs.len(), 3);
    let ev: Vec<Value> = recs.iter().map(|(_, r)| value(r)).collect();
    let resource = json!({"service.name": "Checkout", "tenant.id": "acme", "host.name": "web-1"});
    let scope =
        json!({"name": "checkout.payments", "version": "1.2.3", "attributes": {"lib": "x"}});

    let e = &ev[0];
    assert_eq!(e["tenant_id"], "acme");
    assert_eq!(e["source"], "checkout");
    assert_eq!(e["message"], "payment declined");
    assert_eq!(e["severity"], "ERROR");
    assert_eq!(e["timestamp"], "2024-05-01T12:00:00.123456789Z");
    let m = &e["metadata"];
    assert_eq!(m["trace_id"], "5b8efff798038103d269b633813fc60c");
    assert_eq!(m["span_id"], "eee19b7ec3c1b174");
    assert_eq!(m["trace_flags"], 1);
    assert_eq!(m["severity_number"], 17);
    assert_eq!(m["severity_text"], "Error");
    assert_eq!(m["observed_timestamp"], "2024-05-01T12:00:00.128456789Z");
    assert_eq!(m["attributes"], json!({"order.id": 42, "retry": "no"}));
    assert_eq!(m["resource"], resource);
    assert_eq!(m["scope"], scope);
    // The Kafka record: keyed by tenant, timed by the record's time (ms).
    assert_eq!(recs[0].1.key.as_deref(), Some(&b"acme"[..]));
    assert_eq!(recs[0].1.timestamp_ms, 1_714_564_800_123);

    let e = &ev[1];
    assert_eq!(e["message"], r#"{"code":7,"tags":["a",1]}"#);
    assert_eq!(
        e["severity"], "WARN",
        "from the text when the number is unset"
    );
    assert_eq!(
        e["timestamp"], "2024-05-01T12:00:00.123456789Z",
        "observed time when time is 0"
    );
    assert!(e["metadata"].get("trace_id").is_none());
    assert!(e["metadata"].get("severity_number").is_none());

    let e = &ev[2];
    assert_eq!(e["message"], "bare");
    assert_eq!(e["severity"], "INFO");
    let ts = chrono::DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap();
    let age = chrono::Utc::now().signed_duration_since(ts);
    assert!(
        age.num_seconds().abs() < 600,
        "receive time when both are 0: {ts}"
    );
}

#[tokio::test]
async fn protobuf_records_become_events_field_by_field() {
    let h = harness();
    let r = post_proto(&h, &three_records()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.response().partial_success, None, "unset on full success");
    check_three(&h);
}

#[tokio::test]
async fn otlp_json_as_the_spec_writes_it() {
    let h = harness();
    // Spec deviations from proto3 JSON: hex ids, integer enums,
    // lowerCamelCase keys, 64-bit integers as strings; unknown fields
    // ignored.
    let body = json!({"resourceLogs": [{
    "resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "Checkout"}},
        {"key": "tenant.id", "value": {"stringValue": "acme"}},
        {"key": "host.name", "value": {"stringValue": "web-1"}}]},
    "scopeLogs": [{
        "scope": {"name": "checkout.payments", "version": "1.2.3",
                  "attributes": [{"key": "lib", "value": {"stringValue": "x"}}]},
        "logRecords": [
            {"timeUnixNano": T1.to_string(), "observedTimeUnixNano": (T1 + 5_000_000).to_string(),
             "severityNumber": 17, "severityText": "Error",
             "body": {"stringValue": "  payment declined "},
             "attributes": [{"key": "order.id", "value": {"intValue": "42"}},
                            {"key": "retry", "value": {"stringValue": "no"}}],
             "flags": 1,
             "traceId": "5B8EFFF798038103D269B633813FC60C", "spanId": "eee19b7ec3c1b174",
             "someFutureField": {"x": 1}},
            {"observedTimeUnixNano": T1.to_string(), "severityText": "warning",
             "body": {"kvlistValue": {"values": [
                 {"key": "code", "value": {"intValue": "7"}},
                 {"key": "tags", "value": {"arrayValue": {"values": [
                     {"stringValue": "a"}, {"intValue": "1"}]}}}]}}},
            {"body": {"stringValue": "bare"}}
        ]}]}]});
    let r = send(&h, &[("content-type", JSON)], body.to_string().into_bytes()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let resp = r.json();
    assert!(
        resp.get("partialSuccess").is_none_or(Value::is_null),
        "{resp}"
    );
    check_three(&h);
}

#[tokio::test]
async fn json_as_the_crate_serializes_it_and_gzip() {
    let h = harness();
    let body = serde_json::to_vec(&three_records()).unwrap();
    let r = send(&h, &[("content-type", JSON)], body).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    check_three(&h);

    let h = harness();
    let body = super::daemon::gzip(&three_records().encode_to_vec());
    let r = send(
        &h,
        &[("content-type", PROTOBUF), ("content-encoding", "gzip")],
        body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    check_three(&h);
}

#[tokio::test]
async fn partial_success_counts_and_explains_the_rejected_records() {
    let h = harness();
    let mut req = three_records();
    // A resource whose tenant is not a valid tenant id, and a record with a
    // 3-byte trace id: both refused, the rest stored.
    req.resource_logs.push(resource(
        service("not a tenant"),
        vec![scope(vec![LogRecord {
            body: s("x"),
            ..Default::default()
        }])],
    ));
    req.resource_logs[0].scope_logs[0]
        .log_records
        .push(LogRecord {
            body: s("bad trace"),
            trace_id: vec![1, 2, 3],
            ..Default::default()
        });
    let r = post_proto(&h, &req).await;
    assert_eq!(r.status, StatusCode::OK);
    let ps = r.response().partial_success.expect("partial_success set");
    assert_eq!(ps.rejected_log_records, 2);
    assert!(
        ps.error_message
            .contains("record 3: trace_id must be 16 bytes"),
        "{}",
        ps.error_message
    );
    assert!(
        ps.error_message
            .contains("record 4: tenant_id must match [A-Za-z0-9._-]{1,64}"),
        "{}",
        ps.error_message
    );
    check_three(&h);

    // The same in JSON: the response is OTLP/JSON.
    let h = harness();
    let r = send(
        &h,
        &[("content-type", JSON)],
        serde_json::to_vec(&req).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["partialSuccess"]["rejectedLogRecords"], 2, "{v}");
    assert!(v["partialSuccess"]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("record 3"));
}

#[tokio::test]
async fn bad_bodies_get_400_with_a_status_in_their_encoding() {
    let h = harness();
    let r = send(
        &h,
        &[("content-type", PROTOBUF)],
        b"\xff\xff\xff\xff".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.status_message().starts_with("invalid OTLP protobuf"),
        "{}",
        r.status_message()
    );

    let r = send(
        &h,
        &[("content-type", JSON)],
        b"{\"resourceLogs\": 5}".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = r.json();
    assert_eq!(v["code"], 3);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid OTLP/JSON"),
        "{v}"
    );

    // Every record invalid (no service.name, required as `source`): 400,
    // not a partial success of nothing.
    let req = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            vec![kv("tenant.id", s("acme"))],
            vec![scope(vec![LogRecord {
                body: s("m"),
                ..Default::default()
            }])],
        )],
    };
    let r = post_proto(&h, &req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.status_message(),
        "1 log record(s) rejected: record 0: missing required field \"source\""
    );

    let r = send(&h, &[("content-type", "text/plain")], b"hi".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(r.status_message().contains("application/x-protobuf"));
    assert!(events(&h).is_empty());
}

#[tokio::test]
async fn an_empty_request_is_a_success_that_stores_nothing() {
    let h = harness();
    let r = post_proto(&h, &ExportLogsServiceRequest::default()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.response().partial_success, None);
    let r = send(&h, &[("content-type", JSON)], b"{}".to_vec()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(events(&h).is_empty());
}

#[tokio::test]
async fn json_64_bit_integers_may_be_numbers() {
    let h = harness();
    let body = json!({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "api"}},
                                    {"key": "tenant.id", "value": {"stringValue": "acme"}}]},
        "scopeLogs": [{"logRecords": [
            {"timeUnixNano": T1, "body": {"intValue": 5}, "severityNumber": 9}]}]}]});
    let r = send(&h, &[("content-type", JSON)], body.to_string().into_bytes()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let e = &events(&h)[0];
    assert_eq!(e["timestamp"], "2024-05-01T12:00:00.123456789Z");
    assert_eq!(e["message"], "5");
}

#[tokio::test]
async fn the_tenant_attribute_is_configurable_and_a_key_supplies_a_missing_one() {
    let h = harness_with(
        |c| c.otlp.tenant_attribute = "k8s.namespace.name".into(),
        std::sync::Arc::new(sluice::wal::io::StdFs),
    );
    let mut attrs = service("ignored");
    attrs.push(kv("k8s.namespace.name", s("shop")));
    let req = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            attrs,
            vec![scope(vec![LogRecord {
                body: s("m"),
                ..Default::default()
            }])],
        )],
    };
    assert_eq!(post_proto(&h, &req).await.status, StatusCode::OK);
    assert_eq!(events(&h)[0]["tenant_id"], "shop");

    // With auth: no tenant attribute, the key's one tenant; another tenant
    // is 403; no key is 401 with a Status body.
    let h = super::auth::harness_keys(|_| {});
    let req = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            vec![kv("service.name", s("api"))],
            vec![scope(vec![LogRecord {
                body: s("m"),
                ..Default::default()
            }])],
        )],
    };
    let r = send(&h, &[("content-type", PROTOBUF)], req.encode_to_vec()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.status_message().contains("API key is required"));
    let bearer = format!("Bearer {}", super::auth::ACME);
    let auth = [
        ("content-type", PROTOBUF),
        ("authorization", bearer.as_str()),
    ];
    let r = send(&h, &auth, req.encode_to_vec()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(events(&h)[0]["tenant_id"], "acme");
    let mut other = req.clone();
    other.resource_logs[0]
        .resource
        .as_mut()
        .unwrap()
        .attributes
        .push(kv("tenant.id", s("globex")));
    let r = send(&h, &auth, other.encode_to_vec()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(events(&h).len(), 1);
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let h = harness_with(
        |c| {
            c.rates.tenant_events_per_sec = 1;
            c.rates.tenant_events_burst = 3;
        },
        std::sync::Arc::new(sluice::wal::io::StdFs),
    );
    assert_eq!(
        post_proto(&h, &three_records()).await.status,
        StatusCode::OK
    );
    let r = post_proto(&h, &three_records()).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = r.retry_after.as_deref().unwrap().parse().unwrap();
    assert!(secs >= 1);
    assert!(r
        .status_message()
        .starts_with("rate limit: tenant \"acme\""));
    assert_eq!(events(&h).len(), 3, "the refused batch stored nothing");
}

#[tokio::test]
async fn idempotency_key_replays_the_otlp_answer() {
    let h = harness();
    let mut req = three_records();
    req.resource_logs[0].scope_logs[0]
        .log_records
        .push(LogRecord::default());
    let headers = [("content-type", PROTOBUF), ("idempotency-key", "batch-1")];
    let first = send(&h, &headers, req.encode_to_vec()).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first
            .response()
            .partial_success
            .unwrap()
            .rejected_log_records,
        1
    );
    let again = send(&h, &headers, req.encode_to_vec()).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, first.body, "the same response, replayed");
    assert_eq!(events(&h).len(), 3, "stored once");
}

#[tokio::test]
async fn hostile_shapes_are_refused_before_they_cost_memory() {
    let h = harness();
    // Deep AnyValue nesting: 200 levels of arrays, 1.2 KB.
    let mut v = AnyValue {
        value: Some(any_value::Value::IntValue(1)),
    };
    for _ in 0..200 {
        v = AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![v] })),
        };
    }
    let deep = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            service("acme"),
            vec![scope(vec![LogRecord {
                body: Some(v),
                ..Default::default()
            }])],
        )],
    };
    let r = post_proto(&h, &deep).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.status_message());

    // 60 length-delimited wrappers around 1 MB of varint fields: the scan
    // would read every byte 60 times; it stops at its work budget.
    let mut body = [0x08u8, 0x01].repeat(500_000);
    for _ in 0..60 {
        let mut len = Vec::new();
        prost::encoding::encode_varint(body.len() as u64, &mut len);
        body = [&[0x0a][..], &len, &body].concat();
    }
    let r = send(&h, &[("content-type", PROTOBUF)], body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.status_message().contains("nest too deeply"),
        "{}",
        r.status_message()
    );

    // The same in OTLP/JSON: 30 levels (90 JSON levels) decode, and a body
    // becomes `message` text, so it is stored; 300 levels are refused by
    // the JSON parser's own depth limit (128), not by the stack.
    for (levels, status) in [(30, StatusCode::OK), (300, StatusCode::BAD_REQUEST)] {
        let mut v = json!({"intValue": "1"});
        for _ in 0..levels {
            v = json!({"arrayValue": {"values": [v]}});
        }
        let body = json!({"resourceLogs": [{"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "api"}},
            {"key": "tenant.id", "value": {"stringValue": "acme"}}]},
            "scopeLogs": [{"logRecords": [{"body": v}]}]}]});
        let r = send(&h, &[("content-type", JSON)], body.to_string().into_bytes()).await;
        assert_eq!(r.status, status, "{levels}: {}", r.json());
    }
    assert_eq!(events(&h).len(), 1);
    assert!(events(&h)[0]["message"]
        .as_str()
        .unwrap()
        .starts_with("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]"));

    // More records than max-events-per-request: 413, like /v1/events.
    let many = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            service("acme"),
            vec![scope(vec![LogRecord::default(); 10_001])],
        )],
    };
    let r = post_proto(&h, &many).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.status_message().contains("too many log records"));

    // Millions of empty attributes in one record (2 bytes each on the
    // wire, ~60 decoded): over the message budget, refused by the scan.
    let attrs = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            service("acme"),
            vec![scope(vec![LogRecord {
                attributes: vec![KeyValue::default(); 1_000_000],
                ..Default::default()
            }])],
        )],
    };
    let r = post_proto(&h, &attrs).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        r.status_message().contains("messages"),
        "{}",
        r.status_message()
    );
    assert_eq!(events(&h).len(), 1, "only the 30-level JSON body");
}

/// A 10 MB protobuf body of 5 million empty attributes gzips to ~10 KB; 16
/// in parallel on a real daemon must stay well under what they would decode
/// into (~300 MB each).
#[test]
fn sixteen_parallel_protobuf_bombs_stay_under_512_mib() {
    let d = super::daemon::Daemon::start("");
    let bomb = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            service("acme"),
            vec![scope(vec![LogRecord {
                attributes: vec![KeyValue::default(); 5_000_000],
                ..Default::default()
            }])],
        )],
    };
    let raw = bomb.encode_to_vec();
    assert!(raw.len() > 9_000_000, "{}", raw.len());
    let body = super::daemon::gzip(&raw);
    assert!(body.len() < 30_000, "{} bytes", body.len());
    let before = d.proc_status_kb("VmHWM");
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                sc.spawn(|| {
                    d.post(
                        "/v1/logs",
                        &[("Content-Type", PROTOBUF), ("Content-Encoding", "gzip")],
                        &body,
                    )
                    .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = d.proc_status_kb("VmHWM");
    eprintln!("VmHWM before {before} kB, after 16 protobuf bombs {peak} kB; statuses {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 413 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&413), "{statuses:?}");
    assert!(peak < 512 * 1024, "peak RSS {peak} kB");
}

/// A harness whose stream `otel` claims `/v1/logs`.
fn otel_stream(
    allowed_tenants: &[&str],
    severity_aliases: std::collections::BTreeMap<String, String>,
) -> Harness {
    harness_with(
        |c| {
            c.streams = vec![sluice::streams::StreamConfig {
                name: "otel".into(),
                routes: vec!["/v1/logs".into()],
                topic: "otel-logs".into(),
                dead_letter_topic: "otel-logs-dlq".into(),
                required: Vec::new(),
                key_field: "tenant_id".into(),
                allowed_tenants: allowed_tenants.iter().map(|t| t.to_string()).collect(),
                response_success_field: false,
                severity_aliases,
                requests_per_sec: 0,
                requests_burst: 0,
                events_per_sec: 0,
                events_burst: 0,
            }];
        },
        std::sync::Arc::new(sluice::wal::io::StdFs),
    )
}

#[tokio::test]
async fn a_stream_that_claims_v1_logs_gets_the_otlp_records_under_its_rules() {
    let h = otel_stream(&["acme"], Default::default());
    // The three records carry tenant acme: stored on the claiming stream.
    assert_eq!(
        post_proto(&h, &three_records()).await.status,
        StatusCode::OK
    );
    let recs = h.wal_records();
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|(_, r)| r.stream == "otel"), "{recs:?}");
    // The stream's allowed tenants apply to OTLP records too: globex is
    // refused, and nothing more is stored.
    let mut other = three_records();
    other.resource_logs[0].resource = Some(Resource {
        attributes: service("globex"),
        ..Default::default()
    });
    let r = post_proto(&h, &other).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.status_message());
    assert_eq!(h.wal_records().len(), 3);
}

/// `examples/logs.json` of opentelemetry-proto (tests/fixtures/otlp), as a
/// Collector with a resource processor adding `tenant.id` sends it: the
/// text as upstream wrote it, one attribute inserted in front.
fn upstream_logs_json() -> Vec<u8> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/otlp/logs.json"
    ))
    .unwrap();
    assert!(text.contains("637.704"), "the upstream example, unchanged");
    text.replacen(
        r#""attributes": ["#,
        r#""attributes": [{"key": "tenant.id", "value": {"stringValue": "acme"}},"#,
        1,
    )
    .into_bytes()
}

#[tokio::test]
async fn the_upstream_logs_json_example_is_accepted_with_every_field_mapped() {
    let h = harness();
    let r = send(&h, &[("content-type", JSON)], upstream_logs_json()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.json()["partialSuccess"].is_null(), "full success");
    let ev = events(&h);
    assert_eq!(ev.len(), 1);
    let e = &ev[0];
    assert_eq!(e["tenant_id"], "acme");
    assert_eq!(e["source"], "my.service");
    assert_eq!(e["message"], "Example log record");
    assert_eq!(e["severity"], "INFO", "\"Information\" is no level name");
    assert_eq!(e["timestamp"], "2018-12-13T14:51:00.300Z");
    assert_eq!(
        e["metadata"],
        json!({
            "trace_id": "5b8efff798038103d269b633813fc60c",
            "span_id": "eee19b7ec3c1b174",
            "severity_text": "Information",
            "observed_timestamp": "2018-12-13T14:51:00.300Z",
            "attributes": {
                "string.attribute": "some string",
                "boolean.attribute": true,
                "int.attribute": 10,
                "double.attribute": 637.704,
                "array.attribute": ["many", "values"],
                "map.attribute": {"some.map.key": "some value"},
            },
            "resource": {"tenant.id": "acme", "service.name": "my.service"},
            "scope": {
                "name": "my.library",
                "version": "1.0.0",
                "attributes": {"my.scope.attribute": "some scope attribute"},
            },
        })
    );
    // The same record sent as protobuf becomes the same event.
    let decoded = sluice::ingest::otlp::decode(
        sluice::ingest::otlp::Encoding::Json,
        &upstream_logs_json(),
        &h.state.limits,
    )
    .unwrap();
    let p = harness();
    assert_eq!(post_proto(&p, &decoded).await.status, StatusCode::OK);
    let without_id = |mut v: Vec<Value>| {
        v.iter_mut().for_each(|e| {
            e.as_object_mut().unwrap().remove("id");
        });
        v
    };
    assert_eq!(without_id(events(&p)), without_id(ev));
}

#[tokio::test]
async fn otlp_json_reads_every_proto3_json_form() {
    let h = harness();
    // proto names instead of lowerCamelCase, 64-bit integers as numbers and
    // strings, an enum by name, the double names, a double in a string,
    // base64 both ways, nulls for defaults, an empty AnyValue.
    let body = format!(
        r#"{{"resource_logs": [{{
        "resource": {{"attributes": [
            {{"key": "service.name", "value": {{"stringValue": "api"}}}},
            {{"key": "tenant.id", "value": {{"string_value": "acme"}}}}],
            "droppedAttributesCount": "0"}},
        "scope_logs": [{{"scope": null, "log_records": [
            {{"time_unix_nano": {T1}, "severityNumber": "SEVERITY_NUMBER_ERROR",
             "body": {{"doubleValue": "NaN"}}, "flags": "1", "traceId": "", "spanId": null,
             "eventName": null, "observedTimeUnixNano": "{T1}",
             "attributes": [
                {{"key": "inf", "value": {{"doubleValue": "Infinity"}}}},
                {{"key": "ninf", "value": {{"doubleValue": "-Infinity"}}}},
                {{"key": "half", "value": {{"doubleValue": 0.5}}}},
                {{"key": "exp", "value": {{"doubleValue": 1e300}}}},
                {{"key": "dstr", "value": {{"doubleValue": "2.5"}}}},
                {{"key": "min", "value": {{"intValue": "-9223372036854775808"}}}},
                {{"key": "max", "value": {{"intValue": 9223372036854775807}}}},
                {{"key": "expint", "value": {{"intValue": 1e3}}}},
                {{"key": "b64", "value": {{"bytesValue": "3q2+7w=="}}}},
                {{"key": "b64url", "value": {{"bytesValue": "3q2-7w"}}}},
                {{"key": "empty", "value": {{}}}},
                {{"key": "nullv", "value": null}}]}},
            {{"timeUnixNano": "{T1}", "severityNumber": 21, "body": {{"doubleValue": -1.25}}}}
        ]}}]}}]}}"#
    );
    let r = send(&h, &[("content-type", JSON)], body.into_bytes()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let ev = events(&h);
    assert_eq!(ev.len(), 2);
    let e = &ev[0];
    assert_eq!(e["timestamp"], "2024-05-01T12:00:00.123456789Z");
    assert_eq!(e["severity"], "ERROR");
    assert_eq!(e["message"], "NaN");
    assert_eq!(e["metadata"]["severity_number"], 17);
    assert_eq!(e["metadata"]["trace_flags"], 1);
    assert_eq!(
        e["metadata"]["attributes"],
        json!({"inf": "Infinity", "ninf": "-Infinity", "half": 0.5, "exp": 1e300,
               "dstr": 2.5, "min": i64::MIN, "max": i64::MAX, "expint": 1000,
               "b64": "3q2+7w==", "b64url": "3q2+7w==", "empty": null, "nullv": null})
    );
    assert_eq!(ev[1]["severity"], "FATAL");
    assert_eq!(ev[1]["message"], "-1.25");

    // What proto3 JSON does not allow is still a 400.
    for bad in [
        r#"{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "soon"}]}]}]}"#,
        r#"{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "zz"}]}]}]}"#,
        r#"{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"doubleValue": "inf"}}]}]}]}"#,
        r#"{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"severityNumber": "LOUD"}]}]}]}"#,
        r#"{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"flags": -1}]}]}]}"#,
        r#"{"resourceLogs": []} trailing"#,
    ] {
        let r = send(&h, &[("content-type", JSON)], bad.as_bytes().to_vec()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid OTLP/JSON"),
            "{bad}"
        );
    }
    assert_eq!(events(&h).len(), 2);
}

/// Issue 26 item 8: OTLP/JSON is an object. `[]` was read as an empty
/// request (serde's derived structs accept a sequence of their fields) and
/// answered 200; a body of any other JSON type is a 400 too.
#[tokio::test]
async fn an_otlp_json_body_that_is_not_an_object_is_a_400() {
    let h = harness();
    for bad in ["[]", "[[]]", "[{}]", "null", "\"\"", "0", "true"] {
        let r = send(&h, &[("content-type", JSON)], bad.as_bytes().to_vec()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        let message = r.json()["message"].as_str().unwrap().to_string();
        assert!(message.starts_with("invalid OTLP/JSON"), "{bad}: {message}");
    }
    // The empty object is the empty request: 200, nothing appended.
    let r = send(&h, &[("content-type", JSON)], b"{}".to_vec()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(events(&h).len(), 0);
}

#[tokio::test]
async fn severity_text_honours_the_streams_severity_aliases() {
    let h = otel_stream(&[], [("critical".to_string(), "FATAL".to_string())].into());
    let record = |number: i32, text: &str| LogRecord {
        severity_number: number,
        severity_text: text.into(),
        body: s("m"),
        ..Default::default()
    };
    let req = ExportLogsServiceRequest {
        resource_logs: vec![resource(
            service("acme"),
            vec![scope(vec![
                record(0, "CRITICAL"),
                record(0, "Critical"),
                record(0, "notice"),
                record(9, "CRITICAL"),
            ])],
        )],
    };
    assert_eq!(post_proto(&h, &req).await.status, StatusCode::OK);
    let got: Vec<Value> = events(&h).iter().map(|e| e["severity"].clone()).collect();
    assert_eq!(
        got,
        [json!("FATAL"), json!("FATAL"), json!("INFO"), json!("INFO")],
        "an alias names a level; an unknown text is the default; the number wins"
    );
}

/// Three records and one rejected (no source): a partial success.
fn partial_request() -> ExportLogsServiceRequest {
    let mut req = three_records();
    req.resource_logs[0].scope_logs[0]
        .log_records
        .push(LogRecord::default());
    req
}

/// An events batch with one rejected event: a 202 with an error list.
const EVENTS_BODY: &str = r#"[{"tenant_id":"acme","source":"web","message":"one"},{"tenant_id":"acme","message":"no source"},{"tenant_id":"acme","source":"web","message":"two"}]"#;

#[tokio::test]
async fn an_idempotency_replay_is_the_first_answer_byte_for_byte() {
    let h = harness();
    let cases: [(&str, &str, &str, Vec<u8>); 5] = [
        ("/v1/events", JSON, "ev", EVENTS_BODY.as_bytes().to_vec()),
        (
            "/v1/logs",
            PROTOBUF,
            "pb",
            partial_request().encode_to_vec(),
        ),
        (
            "/v1/logs",
            JSON,
            "js",
            serde_json::to_vec(&partial_request()).unwrap(),
        ),
        (
            "/v1/logs",
            PROTOBUF,
            "pb-ok",
            three_records().encode_to_vec(),
        ),
        (
            "/v1/logs",
            JSON,
            "js-ok",
            serde_json::to_vec(&three_records()).unwrap(),
        ),
    ];
    for (path, ct, key, body) in cases {
        let headers = [("content-type", ct), ("idempotency-key", key)];
        let first = send_to(&h, path, &headers, body.clone()).await;
        assert!(first.status.is_success(), "{path} {ct}: {}", first.status);
        assert_eq!(first.replayed, None);
        let stored = h.wal_records().len();
        let again = send_to(&h, path, &headers, body).await;
        assert_eq!(
            (again.status, &again.content_type, again.replayed.as_deref()),
            (first.status, &first.content_type, Some("true")),
            "{path} {ct}"
        );
        assert_eq!(
            String::from_utf8_lossy(&again.body),
            String::from_utf8_lossy(&first.body),
            "{path} {ct}: the replay is the first answer, byte for byte"
        );
        assert_eq!(
            h.wal_records().len(),
            stored,
            "{path} {ct}: nothing appended"
        );
    }
}

#[tokio::test]
async fn a_key_used_on_one_protocol_is_refused_on_another() {
    let h = harness();
    // The same bytes are an events batch and an (empty) OTLP/JSON request:
    // the key names the events request, so /v1/logs refuses it.
    let body = br#"{"tenant_id":"acme","source":"web","message":"m"}"#.to_vec();
    let key = [("content-type", JSON), ("idempotency-key", "k-events")];
    assert_eq!(
        send_to(&h, "/v1/events", &key, body.clone()).await.status,
        202
    );
    let r = send(&h, &key, body).await;
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.replayed, None);
    let msg = r.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("already used on an events route"), "{msg}");

    // And the reverse: an OTLP/JSON request's key on /v1/events, and on
    // /v1/logs as protobuf.
    let body = serde_json::to_vec(&three_records()).unwrap();
    let key = [("content-type", JSON), ("idempotency-key", "k-otlp")];
    assert_eq!(send(&h, &key, body.clone()).await.status, StatusCode::OK);
    let stored = h.wal_records().len();
    let r = send_to(&h, "/v1/events", &key, body.clone()).await;
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("/v1/logs as OTLP/JSON"),
        "{v}"
    );
    let pb = [("content-type", PROTOBUF), ("idempotency-key", "k-otlp")];
    let r = send(&h, &pb, body).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.status_message().contains("OTLP/JSON"),
        "{}",
        r.status_message()
    );
    assert_eq!(h.wal_records().len(), stored, "nothing appended");
}

/// The one documented exception to byte for byte: an answer over 16 KiB is
/// stored without its error list, so an entry stays bounded.
/// A keyed answer is cut to 2 KiB when it is first sent (its counts whole,
/// the first errors that fit quoted), so the entry stays small and the
/// replay is that answer byte for byte; without a key the answer lists
/// every error (issue 26 item 3).
#[tokio::test]
async fn a_keyed_answer_is_cut_to_2_kib_first_and_replayed_byte_for_byte() {
    let h = harness();
    let mut batch = vec![json!({"tenant_id": "acme", "source": "web", "message": "kept"})];
    batch.extend(
        (0..500).map(|i| json!({"tenant_id": "acme", "message": format!("no source {i}")})),
    );
    let body = serde_json::to_vec(&batch).unwrap();
    let unkeyed = send_to(&h, "/v1/events", &[("content-type", JSON)], body.clone()).await;
    assert_eq!(unkeyed.json()["errors"].as_array().unwrap().len(), 500);
    let headers = [("content-type", JSON), ("idempotency-key", "big")];
    let first = send_to(&h, "/v1/events", &headers, body.clone()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert!(first.body.len() <= 2048, "{}", first.body.len());
    let f = first.json();
    assert_eq!(
        (f["accepted"].as_u64(), f["rejected"].as_u64()),
        (Some(1), Some(500))
    );
    let quoted = f["errors"].as_array().unwrap();
    assert!((10..500).contains(&quoted.len()), "{}", quoted.len());
    // The first errors, in order, as the unkeyed answer has them.
    assert_eq!(
        quoted[..],
        unkeyed.json()["errors"].as_array().unwrap()[..quoted.len()]
    );
    let again = send_to(&h, "/v1/events", &headers, body).await;
    assert_eq!(
        (again.status, &again.content_type, again.replayed.as_deref()),
        (first.status, &first.content_type, Some("true"))
    );
    assert_eq!(again.body, first.body);
}
