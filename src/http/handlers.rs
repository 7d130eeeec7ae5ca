use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use super::{AppError, SharedState};
use crate::auth::keys::presented_key;
use crate::auth::{KeyEntry, RateDecision, TenantScope};
use crate::ingest::{self, BodyFormat, Rejection};

/// Bodies above this are parsed on the blocking pool, so a 10 MiB batch does
/// not stall the async workers.
const BLOCKING_PARSE_BYTES: usize = 64 * 1024;

/// The ingest response, for 202 and for the 400/413 of "nothing accepted".
#[derive(serde::Serialize)]
struct IngestResponse {
    accepted: usize,
    rejected: usize,
    errors: Vec<Rejection>,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
}

/// The ingest route, under the request deadline (`http.request-timeout-ms`).
pub async fn ingest(State(st): State<SharedState>, req: Request) -> Result<Response, AppError> {
    st.counters.requests.fetch_add(1, Ordering::Relaxed);
    let ms = st.http.request_timeout_ms;
    // Set just before the batch is handed to the WAL writer. From then on the
    // append runs to completion in the writer whatever happens to this
    // future, so a deadline can only decide what the client is told.
    let handed = AtomicBool::new(false);
    match tokio::time::timeout(Duration::from_millis(ms), accept(&st, req, &handed)).await {
        Ok(result) => result,
        Err(_) if handed.load(Ordering::Relaxed) => Err(AppError::DeadlineAfterAppend {
            ms,
            retry_after: st.http.retry_after_secs,
        }),
        Err(_) => Err(AppError::DeadlineBeforeAppend(ms)),
    }
}

/// The tenants the request's key may write, and the key, when auth is on.
fn authorize(
    st: &SharedState,
    headers: &axum::http::HeaderMap,
) -> Result<(TenantScope, Option<Arc<KeyEntry>>), AppError> {
    let Some(keys) = &st.keys else {
        return Ok((TenantScope::Any, None));
    };
    let fail = |reason: &str, message: &'static str| {
        st.metrics.auth_failures.with_label_values(&[reason]).inc();
        AppError::Unauthorized(message)
    };
    let presented =
        match presented_key(headers) {
            Ok(Some(k)) => k,
            Ok(None) => return Err(fail(
                "missing",
                "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            )),
            Err(why) => return Err(fail("malformed", why)),
        };
    match keys.authenticate(presented) {
        Some(entry) => Ok((entry.scope.clone(), Some(entry))),
        None => Err(fail("unknown", "unknown API key")),
    }
}

/// Turns a rate decision into `Ok` or its answer, counting refusals.
fn rate_check(
    st: &SharedState,
    decision: RateDecision,
    tenants: &[(String, u32)],
) -> Result<(), AppError> {
    let (scope, unit) = match &decision {
        RateDecision::Allow => return Ok(()),
        RateDecision::Limited { scope, unit, .. } => (*scope, *unit),
        RateDecision::Oversized { scope, unit, .. } => (*scope, *unit),
    };
    st.metrics
        .rate_limited
        .with_label_values(&[scope, unit])
        .inc();
    for (t, n) in tenants {
        st.metrics
            .tenant_events
            .with_label_values(&[st.metrics.tenants.label(Some(t)), "rate_limited"])
            .inc_by(u64::from(*n));
    }
    Err(match decision {
        RateDecision::Allow => unreachable!("returned above"),
        RateDecision::Limited {
            scope,
            unit,
            who,
            retry_after,
        } => {
            // Whole seconds, rounded up: never tell a client to come back
            // before the bucket can hold its request.
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            AppError::RateLimited {
                message: format!(
                    "rate limit: {scope} {who:?} is over its {unit} per second; retry after {secs} s"
                ),
                retry_after: secs,
            }
        }
        RateDecision::Oversized {
            scope,
            who,
            events,
            burst,
            ..
        } => AppError::OverBurst(format!(
            "{events} events for {scope} {who:?} exceed its rate-limit burst of {burst}: this batch can never pass; send smaller batches"
        )),
    })
}

async fn accept(st: &SharedState, req: Request, handed: &AtomicBool) -> Result<Response, AppError> {
    let retry_after = st.http.retry_after_secs;
    if st.shutting_down.load(Ordering::Relaxed) {
        return Err(AppError::ShuttingDown { retry_after });
    }
    let (parts, body) = req.into_parts();
    // Who and how fast, before a byte of the body is read.
    let (scope, key) = authorize(st, &parts.headers)?;
    if let Some(k) = &key {
        rate_check(st, st.rates.check_key_request(&k.name), &[])?;
    }
    if let Some(why) = st.wal.failure() {
        return Err(AppError::StorageFailed {
            detail: why.to_string(),
            retry_after,
        });
    }
    let content_type = match parts.headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| AppError::UnsupportedMediaType("Content-Type is not ASCII".into()))?,
        ),
    };
    let format =
        BodyFormat::from_content_type(content_type).map_err(AppError::UnsupportedMediaType)?;
    // The decompression layer drops Content-Length when it decodes, so a
    // length still present is the real one: refuse early without reading.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.limits.max_body_bytes) {
        return Err(AppError::BodyTooLarge(st.limits.max_body_bytes));
    }
    let (bytes, permit) = read_body(st, body, declared).await?;
    let keyed = match super::idempotent::gate(
        st,
        &parts.headers,
        key.as_ref().map(|k| k.name.as_str()),
        &bytes,
    )? {
        super::idempotent::Gate::Proceed(keyed) => keyed,
        super::idempotent::Gate::Answer(resp) => return Ok(resp),
    };

    // Millisecond precision, as Kafka timestamps have.
    let now = chrono::Utc::now();
    let received_at =
        chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
    let big = bytes.len() > BLOCKING_PARSE_BYTES;
    let state = st.clone();
    let parse = move || {
        ingest::prepare(
            format,
            &bytes,
            &state.limits,
            &state.normalizer,
            received_at,
            &scope,
        )
    };
    let batch = if big {
        tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| AppError::BadRequest(format!("parse task failed: {e}")))??
    } else {
        parse()?
    };
    let rejected = batch.rejected.len();
    for r in &batch.rejected {
        st.metrics
            .events_rejected
            .with_label_values(&[r.kind])
            .inc();
        if r.kind == "forbidden" {
            st.metrics
                .tenant_events
                .with_label_values(&[st.metrics.tenants.label(r.tenant.as_deref()), "forbidden"])
                .inc();
        }
    }
    st.counters
        .events_rejected
        .fetch_add(rejected as u64, Ordering::Relaxed);
    if batch.accepted.is_empty() {
        let status = if batch.all_too_large() {
            StatusCode::PAYLOAD_TOO_LARGE
        } else if batch.all_forbidden() {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        let body = IngestResponse {
            accepted: 0,
            rejected,
            errors: batch.rejected,
            first_seq: None,
            last_seq: None,
        };
        return Ok((status, Json(body)).into_response());
    }

    let tenants = batch.tenant_counts();
    let decision = st
        .rates
        .check_batch(key.as_ref().map(|k| k.name.as_str()), &tenants);
    rate_check(st, decision, &tenants)?;

    let accepted = batch.accepted.len();
    let payloads = batch.accepted.into_iter().map(|e| e.payload).collect();
    handed.store(true, Ordering::Relaxed);
    // Cancellation: if the client goes away while we wait, the append still
    // completes in the writer; the events are then delivered without a 202
    // (at-least-once), never half-acknowledged. With a key, the key is
    // stored when the batch is durable, so the client's retry gets this 202.
    let appended = match keyed {
        None => st.wal.append(payloads).await,
        Some(keyed) => {
            let template = |errors: &[crate::ingest::Rejection]| {
                serde_json::to_vec(&IngestResponse {
                    accepted,
                    rejected,
                    errors: errors.to_vec(),
                    first_seq: None,
                    last_seq: None,
                })
                .unwrap_or_default()
            };
            let response =
                super::idempotent::stored_response(template(&batch.rejected), || template(&[]));
            super::idempotent::append(st, payloads, keyed, response).await
        }
    };
    let range = match appended {
        Ok(range) => range,
        Err(e) => {
            let err = AppError::from_wal(e, retry_after);
            match &err {
                AppError::StorageFailed { .. } => st.fatal.notify_one(),
                AppError::StorageFull { reason, .. }
                    if !st.quota_refusing.swap(true, Ordering::Relaxed) =>
                {
                    tracing::warn!(%reason, "WAL quota reached: answering 503 until replay frees space");
                }
                _ => {}
            }
            st.counters.requests_refused.fetch_add(1, Ordering::Relaxed);
            return Err(err);
        }
    };
    drop(permit);
    if st.quota_refusing.swap(false, Ordering::Relaxed) {
        tracing::info!("WAL quota cleared: accepting again");
    }
    st.counters
        .events_accepted
        .fetch_add(accepted as u64, Ordering::Relaxed);
    let untenanted = accepted as u64 - tenants.iter().map(|(_, n)| u64::from(*n)).sum::<u64>();
    for (label, n) in tenants
        .iter()
        .map(|(t, n)| (Some(t.as_str()), u64::from(*n)))
        .chain(std::iter::once((None, untenanted)))
        .filter(|(_, n)| *n > 0)
    {
        st.metrics
            .tenant_events
            .with_label_values(&[st.metrics.tenants.label(label), "accepted"])
            .inc_by(n);
    }
    let body = IngestResponse {
        accepted,
        rejected,
        errors: batch.rejected,
        first_seq: Some(range.first),
        last_seq: Some(range.last),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Reads the (decompressed) body within the size limit, the in-flight byte
/// budget and the body deadline. The permit is held until the response.
async fn read_body(
    st: &SharedState,
    mut body: Body,
    declared: Option<u64>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), AppError> {
    let limit = st.limits.max_body_bytes;
    let timeout_ms = st.http.body_timeout_ms;
    let read = async {
        let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit) as usize);
        let mut permit: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| AppError::BodyUnreadable(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() as u64 + data.len() as u64 > limit {
                return Err(AppError::BodyTooLarge(limit));
            }
            let n = u32::try_from(data.len()).map_err(|_| AppError::BodyTooLarge(limit))?;
            let more = st
                .inflight
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| AppError::Overloaded)?;
            match &mut permit {
                Some(p) => p.merge(more),
                None => permit = Some(more),
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf, permit))
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), read)
        .await
        .map_err(|_| AppError::BodyTimeout(timeout_ms))?
}

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
    let storage = |e: crate::offsets::OffsetError| AppError::StorageFailed {
        detail: e.to_string(),
        retry_after: st.http.retry_after_secs,
    };
    let written = seq < st.wal.durable().borrow().next_seq;
    let committed = st.offsets.committed().map_err(storage)?;
    let fate = st.offsets.fate(seq).map_err(storage)?;
    Ok(Json(crate::offsets::receipt(seq, written, committed, fate)))
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
    }))
}

fn kafka_state(st: &SharedState) -> serde_json::Value {
    let r = &st.replay;
    json!({
        "connected": r.connected.load(Ordering::Relaxed),
        "producer_recreations": r.producer_recreations.load(Ordering::Relaxed),
    })
}

/// Replay progress. Lag in bytes is estimated from the WAL's average frame.
fn replay_state(st: &SharedState) -> serde_json::Value {
    let r = &st.replay;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let last_seq = st.wal.durable().borrow().next_seq.saturating_sub(1);
    let delivered = get(&r.delivered_through);
    let lag = last_seq.saturating_sub(delivered);
    let c = st.wal.counters();
    let (bytes, records) = (get(&c.bytes), get(&c.records).max(1));
    json!({
        "last_seq": last_seq,
        "delivered_through": delivered,
        "committed": get(&r.committed),
        "lag_records": lag,
        "lag_bytes_estimate": lag * (bytes / records),
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

/// Counts every routed request by route template (bounded cardinality) and
/// status, and times it.
pub async fn track(
    State(st): State<SharedState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let m = &st.metrics;
    m.http_requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}
