//! The archiver's HTTP listener: `GET /v1/analytics?hour=2026-11-26T12`
//! (or `?from=..&to=..`, inclusive), `/health`, `/ready`, `/metrics`.
//! Served by the ingest port's hardened accept loop (the http module's
//! listener, through `cli`'s `serve_archive_listener`, which keeps this
//! module free of the http module): header timeout, head size limit,
//! connection cap. No keys and no TLS: loopback unless
//! `archive.allow-non-loopback`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::analytics::HourStats;
use super::layout::Hour;
use super::writer::{AnalyticsView, WriterMetrics};

/// What the listener reports; the consumer loop updates it.
pub struct ArchiveStatus {
    pub view: AnalyticsView,
    pub writer: Arc<WriterMetrics>,
    /// Set once the writer is open and the consumer subscribed; cleared on
    /// shutdown.
    pub ready: AtomicBool,
    /// Per partition: high watermark minus the next offset to archive. Not
    /// clamped: a negative value is a log that ends below the archive's
    /// position (an offset reset, see `offset_resets`).
    pub lag: Mutex<BTreeMap<i32, i64>>,
    /// Offset resets detected, by (topic, partition): the log the broker
    /// has is not the one the archive's position is in.
    pub offset_resets: Mutex<BTreeMap<(String, i32), u64>>,
    /// Offsets that retention removed before they were archived, by
    /// (topic, partition).
    pub retention_skipped: Mutex<BTreeMap<(String, i32), u64>>,
    /// Assignments retried because what they need (the group's committed
    /// offsets, the watermarks) could not be read.
    pub assignment_retries: AtomicU64,
    /// Records dropped by the exactly-once rule (seq at or below the high mark).
    pub duplicates: AtomicU64,
    /// Records without `instance`/`seq` headers, archived as they are.
    pub unmarked: AtomicU64,
    /// Sum of commit durations, µs.
    pub commit_micros_total: AtomicU64,
    /// Kafka offset commits that failed (retried by the next commit).
    pub kafka_commit_errors: AtomicU64,
    /// The listener's open and refused connections.
    pub http: Arc<crate::ingest::IngestCounters>,
    /// librdkafka errors and warnings not logged by the rate limit.
    pub kafka_log_suppressed: AtomicU64,
}

impl ArchiveStatus {
    pub fn new(view: AnalyticsView, writer: Arc<WriterMetrics>) -> Arc<Self> {
        Arc::new(ArchiveStatus {
            view,
            writer,
            ready: AtomicBool::new(false),
            lag: Mutex::new(BTreeMap::new()),
            offset_resets: Mutex::new(BTreeMap::new()),
            retention_skipped: Mutex::new(BTreeMap::new()),
            assignment_retries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            unmarked: AtomicU64::new(0),
            commit_micros_total: AtomicU64::new(0),
            kafka_commit_errors: AtomicU64::new(0),
            http: Default::default(),
            kafka_log_suppressed: AtomicU64::new(0),
        })
    }
}

pub fn router(status: Arc<ArchiveStatus>) -> Router {
    Router::new()
        .route("/v1/analytics", get(analytics))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(status)
}

#[derive(Deserialize)]
struct AnalyticsQuery {
    hour: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn bad(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": msg.into()})),
    )
        .into_response()
}

/// The response of `/v1/analytics` and `sluice analytics`.
pub fn query(
    view: &AnalyticsView,
    hour: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Result<serde_json::Value, String>, String> {
    let parse = |name: &str, v: &str| {
        Hour::parse(v).ok_or_else(|| format!("{name}={v:?}: expected an hour like 2026-11-26T12"))
    };
    let summary = match (hour, from, to) {
        (Some(h), None, None) => {
            let h = match parse("hour", h) {
                Ok(h) => h,
                Err(e) => return Ok(Err(e)),
            };
            match view.hour(h)? {
                Some(_) => view.summary(h)?,
                None => Some(HourStats::default().summary(&h.key(), "", 0)),
            }
        }
        (None, Some(f), Some(t)) => {
            let (f, t) = match (parse("from", f), parse("to", t)) {
                (Ok(f), Ok(t)) => (f, t),
                (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
            };
            match view.range(f, t) {
                Ok(s) => Some(s),
                Err(e) if e.starts_with("range") => return Ok(Err(e)),
                Err(e) => return Err(e),
            }
        }
        _ => return Ok(Err("give either hour=, or both from= and to=".into())),
    };
    Ok(Ok(serde_json::to_value(summary).map_err(|e| e.to_string())?))
}

async fn analytics(
    State(s): State<Arc<ArchiveStatus>>,
    q: Result<Query<AnalyticsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad("bad query string");
    };
    let view = s.view.clone();
    let r = tokio::task::spawn_blocking(move || {
        query(&view, q.hour.as_deref(), q.from.as_deref(), q.to.as_deref())
    })
    .await;
    match r {
        Ok(Ok(Ok(v))) => Json(v).into_response(),
        Ok(Ok(Err(e))) => bad(e),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "archive: reading analytics");
            (StatusCode::INTERNAL_SERVER_ERROR, e).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn ready(State(s): State<Arc<ArchiveStatus>>) -> Response {
    if s.ready.load(Relaxed) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(s): State<Arc<ArchiveStatus>>) -> Response {
    let mut out = String::new();
    let w = &s.writer;
    let mut one = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    one(
        "sluice_archive_lines_total",
        "counter",
        "Lines appended to hourly and unparsed files.",
        w.lines.load(Relaxed),
    );
    one(
        "sluice_archive_bytes_total",
        "counter",
        "Bytes appended.",
        w.bytes.load(Relaxed),
    );
    one(
        "sluice_archive_fsyncs_total",
        "counter",
        "fsync/fdatasync calls (files, directories, checkpoint).",
        w.fsyncs.load(Relaxed),
    );
    one(
        "sluice_archive_unparsed_total",
        "counter",
        "Records written to logs/unparsed (not JSON or no usable timestamp).",
        w.unparsed.load(Relaxed),
    );
    one(
        "sluice_archive_files_open",
        "gauge",
        "Files held open by the writer.",
        w.files_open.load(Relaxed),
    );
    one(
        "sluice_archive_commits_total",
        "counter",
        "Checkpoints written.",
        w.commits.load(Relaxed),
    );
    one(
        "sluice_archive_recovered_files_total",
        "counter",
        "Files truncated or removed at start (lines after the last checkpoint).",
        w.recovered_files.load(Relaxed),
    );
    one(
        "sluice_archive_checkpoint_entries_dropped_total",
        "counter",
        "Checkpoint entries the start could not read (dropped after keeping a copy; lines stay).",
        w.checkpoint_entries_dropped.load(Relaxed),
    );
    one(
        "sluice_archive_values_cut_total",
        "counter",
        "Analytics values longer than 256 bytes, counted under their cut form.",
        w.values_cut.load(Relaxed),
    );
    one(
        "sluice_archive_files_sealed_over_bound_total",
        "counter",
        "Hours sealed because more than archive.max-open-hours were open.",
        w.files_sealed_over_bound.load(Relaxed),
    );
    one(
        "sluice_archive_events_far_past_total",
        "counter",
        "Events more than 7 days older than the clock (archived in their hour).",
        w.events_far_past.load(Relaxed),
    );
    one(
        "sluice_archive_events_far_future_total",
        "counter",
        "Events more than 1 hour ahead of the clock (archived in their hour).",
        w.events_far_future.load(Relaxed),
    );
    one(
        "sluice_archive_checkpoint_bytes",
        "gauge",
        "Size of the checkpoint (main file and open hours' files) after the last commit, or as read at start.",
        w.checkpoint_bytes.load(Relaxed),
    );
    one(
        "sluice_archive_checkpoint_written_bytes",
        "gauge",
        "Bytes the last commit wrote to the checkpoint (main file and the files of the hours that changed).",
        w.checkpoint_written_bytes.load(Relaxed),
    );
    one(
        "sluice_archive_checkpoint_over_bound_total",
        "counter",
        "Checkpoints larger than the settings' bound (read at start, or written).",
        w.checkpoint_over_bound.load(Relaxed),
    );
    one(
        "sluice_archive_duplicates_dropped_total",
        "counter",
        "Records dropped by the exactly-once rule.",
        s.duplicates.load(Relaxed),
    );
    one(
        "sluice_archive_unmarked_total",
        "counter",
        "Records without instance/seq headers (not deduplicated).",
        s.unmarked.load(Relaxed),
    );
    one(
        "sluice_archive_kafka_commit_errors_total",
        "counter",
        "Failed Kafka offset commits.",
        s.kafka_commit_errors.load(Relaxed),
    );
    one(
        "sluice_archive_http_connections_open",
        "gauge",
        "Open connections on archive.listen.",
        s.http.connections_open.load(Relaxed),
    );
    one(
        "sluice_archive_http_connections_refused_total",
        "counter",
        "Connections closed at once because archive.max-connections were open.",
        s.http.connections_refused.load(Relaxed),
    );
    one(
        "sluice_archive_kafka_log_suppressed_total",
        "counter",
        "librdkafka errors and warnings not logged by the rate limit (one line per distinct message per 30 s).",
        s.kafka_log_suppressed.load(Relaxed),
    );
    one(
        "sluice_archive_assignment_retries_total",
        "counter",
        "Partition assignments retried: the group's committed offsets or the watermarks could not be read.",
        s.assignment_retries.load(Relaxed),
    );
    for (name, help, map) in [
        (
            "sluice_archive_offset_resets_total",
            "Offset resets: the partition's log ends below the archive's position, or the cluster id changed.",
            &s.offset_resets,
        ),
        (
            "sluice_archive_retention_skipped_total",
            "Offsets removed by retention before they were archived.",
            &s.retention_skipped,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        if let Ok(m) = map.lock() {
            for ((t, p), v) in m.iter() {
                let _ = writeln!(out, "{name}{{topic=\"{t}\",partition=\"{p}\"}} {v}");
            }
        }
    }
    let last = w.last_commit_micros.load(Relaxed) as f64 / 1e6;
    let total = s.commit_micros_total.load(Relaxed) as f64 / 1e6;
    let _ = writeln!(
        out,
        "# HELP sluice_archive_checkpoint_seconds Duration of the last commit (write, fdatasync, checkpoint).\n\
         # TYPE sluice_archive_checkpoint_seconds gauge\nsluice_archive_checkpoint_seconds {last}\n\
         # HELP sluice_archive_checkpoint_seconds_total Time spent in commits.\n\
         # TYPE sluice_archive_checkpoint_seconds_total counter\nsluice_archive_checkpoint_seconds_total {total}"
    );
    let _ = writeln!(
        out,
        "# HELP sluice_archive_lag Records behind the partition's high watermark.\n# TYPE sluice_archive_lag gauge"
    );
    if let Ok(lag) = s.lag.lock() {
        for (p, l) in lag.iter() {
            let _ = writeln!(out, "sluice_archive_lag{{partition=\"{p}\"}} {l}");
        }
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}
