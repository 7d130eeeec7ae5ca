//! `/metrics` after a known workload: exact values, Prometheus naming, and
//! `promtool check metrics` on the output.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use super::{ev, harness, JSON};

/// The value of the sample line `name{labels} value`, exactly as rendered.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_after_a_known_workload() {
    let h = harness();
    assert_eq!(
        h.post(JSON, ev("a", "one").to_string()).await.status,
        StatusCode::ACCEPTED
    );
    let r = h
        .post(JSON, json!([ev("a", "two"), ev("b", "three"), {"tenant_id": "bad tenant", "source": "s", "message": "m"}]).to_string())
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        h.post(Some("text/xml"), "<x/>").await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let r = h.post(JSON, json!([{"tenant_id": "a"}]).to_string()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let resp = h
        .app()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();

    assert_eq!(sample(&text, "sluice_events_accepted_total"), 3.0);
    assert_eq!(
        sample(
            &text,
            r#"sluice_events_rejected_total{reason="invalid_field"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"sluice_events_rejected_total{reason="missing_field"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"sluice_http_requests_total{route="/v1/events",status="202"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            r#"sluice_http_requests_total{route="/v1/events",status="415"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"sluice_http_requests_total{route="/v1/events",status="400"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"sluice_http_request_duration_seconds_count{route="/v1/events"}"#
        ),
        4.0
    );
    assert_eq!(sample(&text, "sluice_wal_records_total"), 3.0);
    assert_eq!(sample(&text, "sluice_wal_appends_total"), 2.0);
    let fsyncs = sample(&text, "sluice_wal_fsyncs_total");
    assert_eq!(fsyncs, 2.0, "one group commit per request here");
    assert_eq!(
        sample(&text, "sluice_wal_fsync_duration_seconds_count"),
        fsyncs
    );
    assert_eq!(sample(&text, "sluice_wal_group_commit_records_sum"), 3.0);
    assert_eq!(
        sample(&text, r#"sluice_wal_refused_total{reason="full"}"#),
        0.0
    );
    assert_eq!(sample(&text, "sluice_wal_segments"), 1.0);
    assert_eq!(sample(&text, "sluice_replay_last_seq"), 3.0);
    assert_eq!(
        sample(&text, "sluice_replay_lag_records"),
        3.0,
        "no replayer in this harness"
    );
    assert_eq!(sample(&text, "sluice_wal_failed"), 0.0);
    assert_eq!(
        sample(&text, r#"sluice_dead_letter_total{target="file"}"#),
        0.0
    );
    assert!(sample(&text, "sluice_wal_disk_bytes") > 24.0);
    assert!(sample(&text, "process_resident_memory_bytes") > 0.0);

    // promtool's linter: naming conventions (_total on counters, base units).
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && report.trim().is_empty(),
                "promtool:\n{report}"
            );
        }
        Err(_) if std::env::var_os("SLUICE_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("promtool not installed: lint skipped (CI installs it)");
        }
        Err(e) => panic!("promtool required but not runnable: {e}"),
    }
}

/// A fresh daemon exposes every labelled series it knows at 0, so that
/// `rate()` and the dashboard show 0, not nothing, before the first event.
#[test]
fn a_fresh_daemon_exposes_known_label_values_at_zero() {
    let d = super::hostile::daemon(&[]);
    let (status, text) = super::hostile::request(
        &d.addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    for series in [
        r#"sluice_events_rejected_total{reason="missing_field"} 0"#,
        r#"sluice_events_rejected_total{reason="invalid_field"} 0"#,
        r#"sluice_events_rejected_total{reason="forbidden"} 0"#,
        r#"sluice_auth_failures_total{reason="unknown"} 0"#,
        r#"sluice_rate_limited_requests_total{scope="tenant",unit="events"} 0"#,
        r#"sluice_stream_events_total{outcome="accepted",stream="default"} 0"#,
    ] {
        assert!(text.contains(series), "{series} missing in:\n{text}");
    }
}
