//! One test per body format and shape, and the awkward inputs.

use std::io::Write;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;

use super::{ev, harness, value, CSV, JSON, NDJSON};

#[tokio::test]
async fn json_single_object_is_normalized_into_the_wal() {
    let h = harness();
    let body = json!({"id": "evt-1", "tenant_id": "acme", "source": "  Billing-API ",
        "message": "  paid  ", "severity": "error", "timestamp": 1714564800123u64,
        "metadata": {"order": 7}, "custom": [1, "two"]});
    let r = h.post(JSON, body.to_string()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    assert_eq!(
        r.json,
        json!({"accepted": 1, "rejected": 0, "errors": [], "first_seq": 1, "last_seq": 1})
    );
    let recs = h.wal_records();
    assert_eq!(recs.len(), 1);
    let (seq, rec) = &recs[0];
    assert_eq!(*seq, 1);
    assert_eq!(rec.key.as_deref(), Some(&b"acme"[..]));
    assert_eq!(rec.header("id"), Some(&b"evt-1"[..]));
    assert_eq!(rec.timestamp_ms, 1714564800123);
    assert_eq!(
        value(rec),
        json!({"id": "evt-1", "tenant_id": "acme", "timestamp": "2024-05-01T12:00:00.123Z",
            "severity": "ERROR", "source": "billing-api", "message": "paid",
            "metadata": {"order": 7}, "custom": [1, "two"]})
    );
}

#[tokio::test]
async fn json_wrappers_and_arrays() {
    let h = harness();
    let r = h
        .post(JSON, json!({"event": ev("a", "one")}).to_string())
        .await;
    assert_eq!(
        (r.status, r.json["accepted"].clone()),
        (StatusCode::ACCEPTED, json!(1))
    );
    let r = h
        .post(
            JSON,
            json!({"events": [ev("a", "two"), ev("b", "three")]}).to_string(),
        )
        .await;
    assert_eq!(
        (r.json["first_seq"].clone(), r.json["last_seq"].clone()),
        (json!(2), json!(3))
    );
    let r = h
        .post(JSON, json!([ev("a", "four"), ev("a", "five")]).to_string())
        .await;
    assert_eq!(r.json["accepted"], 2);
    // An event that merely has a field named "event" is an event, not a wrapper.
    let mut odd = ev("a", "six");
    odd["event"] = json!("login");
    let r = h.post(JSON, odd.to_string()).await;
    assert_eq!(r.json["accepted"], 1);
    let msgs: Vec<_> = h
        .wal_records()
        .iter()
        .map(|(_, r)| value(r)["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(msgs, ["one", "two", "three", "four", "five", "six"]);
    assert_eq!(value(&h.wal_records()[5].1)["event"], "login");
}

#[tokio::test]
async fn ndjson_reports_per_line() {
    let h = harness();
    let body = format!(
        "{}\n\n{{not json\n{}\r\n{}\n",
        ev("a", "first"),
        json!({"tenant_id": "a", "source": "s"}),
        ev("b", "last")
    );
    let r = h.post(NDJSON, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json["accepted"], 2);
    let errors = r.json["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert_eq!(
        (errors[0]["index"].clone(), errors[0]["line"].clone()),
        (json!(1), json!(3))
    );
    assert!(errors[0]["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid JSON"));
    assert_eq!(
        errors[1],
        json!({"index": 2, "line": 4, "id": null, "error": "missing required field \"message\""})
    );
}

#[tokio::test]
async fn csv_header_names_fields_and_numbers_stay_strings_unless_known() {
    let h = harness();
    let body = "tenant_id,source,message,timestamp,code,metadata.region\n\
                acme,web,\"hello, world\",1714564800,007,eu\n\
                acme,web,second,,42,\n";
    let r = h.post(CSV, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    assert_eq!(r.json["accepted"], 2);
    let recs = h.wal_records();
    let first = value(&recs[0].1);
    assert_eq!(first["message"], "hello, world");
    assert_eq!(
        first["timestamp"], "2024-05-01T12:00:00Z",
        "known field: epoch"
    );
    assert_eq!(first["code"], "007", "unknown field: stays a string");
    assert_eq!(first["metadata"], json!({"region": "eu"}));
    let second = value(&recs[1].1);
    assert_eq!(second["code"], "42");
    assert!(second.get("metadata").is_none(), "empty cell = absent");
}

#[tokio::test]
async fn csv_row_with_wrong_field_count_is_rejected_alone() {
    let h = harness();
    let r = h
        .post(CSV, "tenant_id,source,message\na,s,ok\na,s\na,s,also ok\n")
        .await;
    assert_eq!(r.json["accepted"], 2);
    assert_eq!(
        r.json["errors"],
        json!([{"index": 1, "line": 3, "id": null, "error": "row has 2 fields but the header names 3"}])
    );
}

/// A column the header row does not name: a value under it would be
/// dropped, so its row is refused; left empty (a trailing comma) it is fine.
#[tokio::test]
async fn csv_value_under_an_unnamed_column_is_refused_with_its_row() {
    let h = harness();
    let r = h
        .post(CSV, "tenant_id,source,message,\na,s,ok,\na,s,dropped?,x\n")
        .await;
    assert_eq!(r.json["accepted"], 1, "{:?}", r.json);
    assert_eq!(
        r.json["errors"],
        json!([{"index": 1, "line": 3, "id": null, "error": "column 4 has a value but the header row names no field there"}])
    );
}

/// A UTF-8 byte order mark before a JSON or NDJSON body is accepted, as it
/// is before CSV.
#[tokio::test]
async fn a_utf8_bom_before_json_and_ndjson_is_accepted() {
    let h = harness();
    let body = format!("\u{feff}{}", json!(ev("a", "bom json")));
    let r = h.post(JSON, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let body = format!("\u{feff}{}\n", json!(ev("a", "bom ndjson")));
    let r = h.post(NDJSON, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let body = "\u{feff}tenant_id,source,message\na,s,bom csv\n".to_string();
    let r = h.post(CSV, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let msgs: Vec<_> = h
        .wal_records()
        .iter()
        .map(|(_, r)| value(r)["message"].clone())
        .collect();
    assert_eq!(
        msgs,
        [json!("bom json"), json!("bom ndjson"), json!("bom csv")]
    );
}

/// Valid gzip followed by bytes that are not another member: the error says
/// so, not "unexpected end of file".
#[tokio::test]
async fn junk_after_a_gzip_member_is_named_in_the_400() {
    let h = harness();
    let mut body = gzip(json!([ev("a", "gz")]).to_string().as_bytes());
    body.extend_from_slice(b"trailing junk");
    let r = post_encoded(&h, "gzip", body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let text = r.json.to_string();
    assert!(
        text.contains("13 bytes after gzip member 1 are not a gzip member"),
        "{text}"
    );
    assert!(!text.contains("unexpected end of file"), "{text}");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn post_encoded(h: &super::Harness, encoding: &str, body: Vec<u8>) -> super::Reply {
    h.send(
        Request::post("/v1/events")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, encoding)
            .body(Body::from(body))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn gzip_and_zstd_bodies() {
    let h = harness();
    let body = json!([ev("a", "gz")]).to_string();
    let r = post_encoded(&h, "gzip", gzip(body.as_bytes())).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let body = json!([ev("a", "zs")]).to_string();
    let r = post_encoded(&h, "zstd", zstd::encode_all(body.as_bytes(), 3).unwrap()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let msgs: Vec<_> = h
        .wal_records()
        .iter()
        .map(|(_, r)| value(r)["message"].clone())
        .collect();
    assert_eq!(msgs, [json!("gz"), json!("zs")]);
    // Corrupt compressed data is the client's error.
    let r = post_encoded(&h, "gzip", b"\x1f\x8bnot really gzip".to_vec()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // An encoding we do not speak.
    let r = post_encoded(&h, "br", b"xx".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn decompression_bomb_is_refused_at_the_limit_after_decompression() {
    let h = super::harness_with(
        |c| c.limits.max_body_bytes = 1024 * 1024,
        std::sync::Arc::new(sluice::wal::io::StdFs),
    );
    // 64 MiB of spaces compress to ~64 KiB.
    let bomb = gzip(&vec![b' '; 64 * 1024 * 1024]);
    assert!(bomb.len() < 100 * 1024);
    let r = post_encoded(&h, "gzip", bomb).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.json["error"]
        .as_str()
        .unwrap()
        .contains("after decompression"));
    assert!(h.wal_records().is_empty());
}

#[tokio::test]
async fn invalid_utf8() {
    let h = harness();
    let r = h.post(JSON, &b"{\"tenant_id\":\"a\xff\"}"[..]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json["error"].as_str().unwrap().contains("not valid JSON"));
    let mut nd = ev("a", "fine").to_string().into_bytes();
    nd.extend_from_slice(b"\n{\"message\":\"\xc3\x28\"}\n");
    let r = h.post(NDJSON, nd).await;
    assert_eq!(r.json["accepted"], 1);
    assert!(r.json["errors"][0]["error"]
        .as_str()
        .unwrap()
        .contains("UTF-8"));
}

#[tokio::test]
async fn deep_nesting() {
    let h = harness();
    let nest = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    // Depth 65 inside one event (the event object is depth 1): that event only.
    let body = format!(
        "[{}, {{\"tenant_id\":\"a\",\"source\":\"s\",\"message\":\"m\",\"x\":{}}}]",
        ev("a", "ok"),
        nest(64)
    );
    let r = h.post(JSON, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        r.json["errors"][0]["error"],
        "event nesting is deeper than 64"
    );
    // Beyond the parser's own limit: the body is unparseable, and no stack
    // overflow on the way.
    let r = h.post(JSON, nest(100_000)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn huge_numbers_are_kept_exactly() {
    let h = harness();
    let body = r#"{"tenant_id":"a","source":"s","message":"m","big":123456789012345678901234567890.000000000000000000001,"neg":-1e400}"#;
    let r = h.post(JSON, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    let text = String::from_utf8(h.wal_records()[0].1.value.clone()).unwrap();
    assert!(
        text.contains("123456789012345678901234567890.000000000000000000001"),
        "{text}"
    );
    assert!(text.contains(r#""neg":-1e400"#), "as sent: {text}");
    assert!(
        text.find("big") < text.find("neg"),
        "unknown fields keep their order: {text}"
    );
}

#[tokio::test]
async fn empty_body_and_missing_content_type() {
    let h = harness();
    let r = h.post(JSON, "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["error"], "empty body: no events");
    let r = h.post(NDJSON, "\n\n").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // No Content-Type: treated as JSON.
    let r = h.post(None, ev("a", "untyped").to_string()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn chunked_body() {
    let h = harness();
    let text = json!([ev("a", "c1"), ev("a", "c2")]).to_string();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        text.as_bytes().chunks(7).map(|c| Ok(c.to_vec())).collect();
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let r = h.post(JSON, body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json);
    assert_eq!(r.json["accepted"], 2);
}
