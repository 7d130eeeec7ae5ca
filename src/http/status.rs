//! The status routes: liveness, readiness, `/stats`, receipts and
//! `/metrics`.

use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ingest::authorize;
use super::{AppError, SharedState};

pub async fn receipt(
    State(st): State<SharedState>,
    Path(seq): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Json<serde_json::Value>, AppError> {
    // Any valid key may read receipts: they say only whether a sequence
    // number is durable and delivered.
    authorize(&st, &headers)?;
    let seq: u64 = seq
        .parse()
        .ok()
        .filter(|&s| s >= 1)
        .ok_or_else(|| AppError::BadRequest("seq must be a positive integer".into()))?;
    let storage = |e: crate::replay::offsets::OffsetError| AppError::StorageFailed {
        detail: e.to_string(),
        retry_after: st.http.retry_after_secs,
    };
    let written = seq < st.wal.durable().borrow().next_seq;
    let committed = st.offsets.committed().map_err(storage)?;
    let fate = st.offsets.fate(seq).map_err(storage)?;
    Ok(Json(crate::replay::offsets::receipt(
        seq, written, committed, fate,
    )))
}

/// Liveness: 503 once the WAL has failed, since only a restart recovers it.
pub async fn health(State(st): State<SharedState>) -> Response {
    match st.wal.failure() {
        None => Json(json!({ "status": "ok" })).into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "failed", "reason": format!("WAL failed: {why}") })),
        )
            .into_response(),
    }
}

/// Ready when the WAL can take writes: not failed, under quota, enough disk.
pub async fn ready(State(st): State<SharedState>) -> Response {
    let cfg = st.wal.config();
    let mut reasons = Vec::new();
    if st.shutting_down.load(Ordering::Relaxed) {
        reasons.push("shutting down".to_string());
    }
    if let Some(why) = st.wal.failure() {
        reasons.push(format!("WAL failed: {why}"));
    }
    if st.replay.sink_down.load(Ordering::Relaxed) {
        reasons.push("archive files sink down: replay is retrying".to_string());
    }
    // Ready means one maximum-size event still fits: stateless, so it clears
    // by itself as GC frees space even if no client is sending.
    let used = st.wal.disk_bytes();
    let headroom = crate::wal::format::frame_len(st.limits.max_event_bytes) as u64;
    if used.saturating_add(headroom) > cfg.max_bytes {
        reasons.push(format!(
            "WAL at quota: {used} of {} bytes; a maximum-size event would not fit",
            cfg.max_bytes
        ));
    }
    match st.wal.free_bytes() {
        Ok(free) if free < cfg.min_free_bytes.saturating_add(headroom) => reasons.push(format!(
            "disk low: {free} bytes free, {} required",
            cfg.min_free_bytes
        )),
        Ok(_) => {}
        Err(e) => reasons.push(format!("cannot read free disk space: {e}")),
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": reasons.is_empty(),
        "reasons": reasons,
        "wal": { "disk_bytes": used, "max_bytes": cfg.max_bytes },
        "kafka": kafka_state(&st),
    });
    (status, Json(body)).into_response()
}

pub async fn stats(State(st): State<SharedState>) -> Json<serde_json::Value> {
    let c = &st.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Json(json!({
        "instance": crate::instance::current(),
        "idempotency": { "keys_held": st.idempotency.held() },
        "ingest": {
            "requests": get(&c.requests),
            "events_accepted": get(&c.events_accepted),
            "events_rejected": get(&c.events_rejected),
            "requests_refused": get(&c.requests_refused),
        },
        "wal": st.wal.stats(),
        "replay": replay_state(&st),
        "kafka": kafka_state(&st),
        "streams": streams_state(&st),
    }))
}

/// Each stream's routes, topics and event counts, by name.
fn streams_state(st: &SharedState) -> serde_json::Value {
    let count = |name: &str, outcome: &str| {
        st.metrics
            .stream_events_total
            .with_label_values(&[name, outcome])
            .get()
    };
    let mut out = serde_json::Map::new();
    for s in st.streams.all() {
        out.insert(
            s.name.clone(),
            json!({
                "routes": s.routes,
                "topic": s.topic,
                "dead_letter_topic": s.dead_letter_topic,
                "events_accepted": count(&s.name, "accepted"),
                "events_rejected": count(&s.name, "rejected"),
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// Kafka as replay sees it. `failing` (null while deliveries succeed) is the
/// last failure that restarted replay, by kind; `stall` (null unless replay
/// is stalled) names what the cluster showed when no delivery report came
/// in time, e.g. NOT_ENOUGH_REPLICAS with the partitions and their in-sync
/// replicas. During a stall both are set: `failing.kind` is `stall`, and
/// `stall.cause` says why.
fn kafka_state(st: &SharedState) -> serde_json::Value {
    let r = &st.replay;
    let stall = r.stall().map(|(s, lasted)| {
        json!({
            "cause": s.cause.label(),
            "detail": s.detail,
            "seconds": lasted.as_secs(),
        })
    });
    // Why deliveries fail, while they do (null once one succeeds again).
    let failing = r.failing.lock().ok().and_then(|f| {
        f.as_ref().map(|f| {
            json!({
                "kind": f.kind.label(),
                "reason": f.reason,
                "from_seq": f.from_seq,
                "retries": f.retries,
                "for_seconds": f.since.elapsed().as_secs(),
                "client_error": f.client_error,
            })
        })
    });
    json!({
        "connected": r.connected.load(Ordering::Relaxed),
        "producer_recreations": r.producer_recreations.load(Ordering::Relaxed),
        "failing": failing,
        "stall": stall,
    })
}

/// Replay progress. Lag in bytes is estimated from the WAL's average frame.
fn replay_state(st: &SharedState) -> serde_json::Value {
    let r = &st.replay;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let lag = crate::replay::Lag::of(&st.wal, r);
    json!({
        "last_seq": lag.last_seq,
        "delivered_through": lag.delivered_through,
        "committed": get(&r.committed),
        "lag_records": lag.records,
        "lag_bytes_estimate": lag.bytes_estimate,
        "in_flight": get(&r.in_flight),
        "produced": get(&r.produced),
        "delivered": get(&r.delivered),
        "retries": get(&r.retries),
        "dead_lettered_topic": get(&r.dead_lettered_topic),
        "dead_lettered_file": get(&r.dead_lettered_file),
        "gap_records": get(&r.gap_records),
    })
}

pub async fn metrics(State(st): State<SharedState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}
