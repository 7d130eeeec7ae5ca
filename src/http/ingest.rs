//! The ingest route (`POST /v1/events` and its aliases): admit the request,
//! read and decode its body, parse it into events, check rates, append to
//! the WAL, answer. Each step is a function below, in that order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use tokio::sync::OwnedSemaphorePermit;

use super::{AppError, SharedState};
use crate::auth::keys::presented_key;
use crate::auth::{KeyEntry, RateDecision, TenantScope};
use crate::ingest::decode::{self, Coding, DecodeError};
use crate::ingest::{self, BodyFormat, Rejection};
use crate::streams::Stream;

/// Bodies above this are parsed on the blocking pool, so a 10 MiB batch does
/// not stall the async workers.
const BLOCKING_PARSE_BYTES: usize = 64 * 1024;

/// The ingest response, for 202 and for the 400/413 of "nothing accepted".
/// `first_seq` and `last_seq` stay the last two fields: a 202 is rendered
/// from the body with them null (`idempotency::Answer::with_seqs`).
#[derive(serde::Serialize)]
struct IngestResponse<'a> {
    /// Only on streams with `response-success-field`: no event rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    success: Option<bool>,
    accepted: usize,
    rejected: usize,
    errors: &'a [Rejection],
    first_seq: Option<u64>,
    last_seq: Option<u64>,
}

/// The ingest route of `stream`, under the request deadline
/// (`http.request-timeout-ms`).
pub async fn ingest(
    State(st): State<SharedState>,
    stream: Arc<Stream>,
    req: Request,
) -> Result<Response, AppError> {
    st.counters.requests.fetch_add(1, Ordering::Relaxed);
    let handed = AtomicBool::new(false);
    under_deadline(&st, &handed, accept(&st, &stream, req, &handed)).await
}

/// Runs a request's stages under the request deadline. `handed` is set just
/// before the batch is handed to the WAL writer: from then on the append
/// runs to completion in the writer whatever happens to this future, so a
/// deadline can only decide what the client is told.
pub(super) async fn under_deadline<T, E: From<AppError>>(
    st: &SharedState,
    handed: &AtomicBool,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let ms = st.http.request_timeout_ms;
    match tokio::time::timeout(Duration::from_millis(ms), work).await {
        Ok(result) => result,
        Err(_) if handed.load(Ordering::Relaxed) => Err(AppError::DeadlineAfterAppend {
            ms,
            retry_after: st.http.retry_after_secs,
        }
        .into()),
        Err(_) => Err(AppError::DeadlineBeforeAppend(ms).into()),
    }
}

/// The tenants the request's key may write, and the key, when auth is on.
pub(super) fn authorize(
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
pub(super) fn rate_check(
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

/// One ingest request, step by step. Each step either hands its result to
/// the next or ends the request with its answer.
async fn accept(
    st: &SharedState,
    stream: &Arc<Stream>,
    req: Request,
    handed: &AtomicBool,
) -> Result<Response, AppError> {
    let (parts, body) = req.into_parts();
    let admitted = admit(st, &parts.headers, BodyFormat::from_content_type)?;
    rate_check(st, stream.rates.check_request(&stream.name), &[])?;
    let (bytes, permit) = read_and_decode(st, body, &admitted).await?;
    // Idempotency-Key: a repeat is answered here, before parsing; a new key
    // is held in flight until this request has its answer.
    let keyed = match super::idempotent::gate(
        st,
        &parts.headers,
        admitted.key.as_ref().map(|k| k.name.as_str()),
        &stream.name,
        &bytes,
        crate::idempotency::Protocol::Events,
    )? {
        super::idempotent::Gate::Proceed(keyed) => keyed,
        super::idempotent::Gate::Answer(resp) => return Ok(resp),
    };
    let batch = parse(st, stream, bytes, admitted.format, admitted.scope).await?;
    let rejected = count_rejections(st, &batch);
    st.metrics
        .stream_events(stream, "rejected", rejected as u64);
    let success = stream.response_success_field.then_some(rejected == 0);
    if batch.accepted.is_empty() {
        return Ok(nothing_accepted(batch, rejected, success));
    }
    let tenants = batch.tenant_counts();
    let decision = st
        .rates
        .check_batch(admitted.key.as_ref().map(|k| k.name.as_str()), &tenants);
    rate_check(st, decision, &tenants)?;
    let accepted = batch.accepted.len();
    rate_check(
        st,
        stream
            .rates
            .check_events(&stream.name, u32::try_from(accepted).unwrap_or(u32::MAX)),
        &tenants,
    )?;
    let payloads = batch.accepted.into_iter().map(|e| e.payload).collect();
    // The 202, before its sequence numbers: sent below and, with a key,
    // stored for the replay (then its errors cut to fit 2 KiB, in both).
    let answer = match keyed {
        None => accepted_answer(accepted, rejected, &batch.rejected, success),
        Some(_) => super::idempotent::fitted(batch.rejected.len(), |n| {
            accepted_answer(accepted, rejected, &batch.rejected[..n], success)
        }),
    };
    let keyed = keyed.map(|k| (k, answer.clone()));
    let range = append(st, payloads, keyed, handed).await?;
    drop(permit);
    st.metrics
        .stream_events(stream, "accepted", accepted as u64);
    count_accepted(st, accepted, &tenants);
    Ok(super::idempotent::answer(
        answer.status,
        &answer.content_type,
        answer.render(range),
    ))
}

/// What admission learnt from the request head; `F` is the body format
/// the route reads from `Content-Type`.
pub(super) struct Admitted<F = BodyFormat> {
    pub(super) scope: TenantScope,
    pub(super) key: Option<Arc<KeyEntry>>,
    pub(super) format: F,
    codings: Vec<Coding>,
    /// `Content-Length`, when sent and numeric.
    declared: Option<u64>,
}

/// Everything decided before a byte of the body is read: shutdown, who and
/// how fast, a failed WAL, the body's type (read by `media`), codings and
/// declared length.
pub(super) fn admit<F>(
    st: &SharedState,
    headers: &axum::http::HeaderMap,
    media: impl FnOnce(Option<&str>) -> Result<F, String>,
) -> Result<Admitted<F>, AppError> {
    let retry_after = st.http.retry_after_secs;
    if st.shutting_down.load(Ordering::Relaxed) {
        return Err(AppError::ShuttingDown { retry_after });
    }
    // Who and how fast, before a byte of the body is read.
    let (scope, key) = authorize(st, headers)?;
    if let Some(k) = &key {
        rate_check(st, st.rates.check_key_request(&k.name), &[])?;
    }
    if let Some(why) = st.wal.failure() {
        return Err(AppError::StorageFailed {
            detail: why.to_string(),
            retry_after,
        });
    }
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| AppError::UnsupportedMediaType("Content-Type is not ASCII".into()))?,
        ),
    };
    let format = media(content_type).map_err(AppError::UnsupportedMediaType)?;
    let codings = content_codings(headers)?;
    // The sent body (compressed or not) also counts against the limit, so a
    // length over it is refused without reading.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.limits.max_body_bytes) {
        return Err(AppError::BodyTooLarge(st.limits.max_body_bytes));
    }
    Ok(Admitted {
        scope,
        key,
        format,
        codings,
        declared,
    })
}

/// The body as sent, then with its codings undone; the permit charges its
/// bytes to the in-flight budget until the response.
pub(super) async fn read_and_decode<F>(
    st: &SharedState,
    body: Body,
    admitted: &Admitted<F>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), AppError> {
    let (bytes, permit) = read_body(st, body, admitted.declared).await?;
    if admitted.codings.is_empty() {
        Ok((bytes, permit))
    } else {
        decode(st, bytes, &admitted.codings, permit).await
    }
}

/// Parses and normalizes the body into events; a large body on the blocking
/// pool.
async fn parse(
    st: &SharedState,
    stream: &Arc<Stream>,
    bytes: Vec<u8>,
    format: BodyFormat,
    scope: TenantScope,
) -> Result<ingest::Batch, AppError> {
    let received_at = received_now();
    let len = bytes.len();
    let state = st.clone();
    let stream = stream.clone();
    let parse = move || {
        ingest::prepare(
            format,
            &bytes,
            &state.limits,
            &stream.normalizer,
            received_at,
            &scope,
        )
    };
    Ok(run_parse(len, parse)
        .await
        .map_err(AppError::BadRequest)??)
}

/// The request's receive time, at millisecond precision as Kafka
/// timestamps have.
pub(super) fn received_now() -> chrono::DateTime<chrono::Utc> {
    let now = chrono::Utc::now();
    chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// Runs a body's parse: one larger than [`BLOCKING_PARSE_BYTES`] on the
/// blocking pool, so it does not stall the async workers. `Err` only when
/// the blocking task itself failed.
pub(super) async fn run_parse<T: Send + 'static>(
    len: usize,
    parse: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if len > BLOCKING_PARSE_BYTES {
        tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| format!("parse task failed: {e}"))
    } else {
        Ok(parse())
    }
}

/// Counts the refused events by reason (and forbidden ones by tenant).
pub(super) fn count_rejections(st: &SharedState, batch: &ingest::Batch) -> usize {
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
    rejected
}

/// 413 when every event was too large, 403 when every one was forbidden,
/// else 400; with every event's error.
fn nothing_accepted(batch: ingest::Batch, rejected: usize, success: Option<bool>) -> Response {
    let status = if batch.all_too_large() {
        StatusCode::PAYLOAD_TOO_LARGE
    } else if batch.all_forbidden() {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::BAD_REQUEST
    };
    let body = IngestResponse {
        success,
        accepted: 0,
        rejected,
        errors: &batch.rejected,
        first_seq: None,
        last_seq: None,
    };
    (status, Json(body)).into_response()
}

/// Hands the events to the WAL and waits for their fdatasync.
pub(super) async fn append(
    st: &SharedState,
    payloads: Vec<Vec<u8>>,
    keyed: Option<(super::idempotent::Keyed, crate::idempotency::Answer)>,
    handed: &AtomicBool,
) -> Result<crate::wal::SeqRange, AppError> {
    let retry_after = st.http.retry_after_secs;
    handed.store(true, Ordering::Relaxed);
    // Cancellation: if the client goes away while we wait, the append still
    // completes in the writer; the events are then delivered without a 202
    // (at-least-once), never half-acknowledged. With a key, the key is
    // stored when the batch is durable, so the client's retry gets this 202.
    let appended = match keyed {
        None => st.wal.append(payloads).await,
        Some((keyed, response)) => super::idempotent::append(st, payloads, keyed, response).await,
    };
    match appended {
        Ok(range) => Ok(range),
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
            Err(err)
        }
    }
}

/// The 202 of an accepted batch, its sequence numbers to be filled in.
fn accepted_answer(
    accepted: usize,
    rejected: usize,
    errors: &[Rejection],
    success: Option<bool>,
) -> crate::idempotency::Answer {
    let body = serde_json::to_vec(&IngestResponse {
        success,
        accepted,
        rejected,
        errors,
        first_seq: None,
        last_seq: None,
    })
    .unwrap_or_default();
    crate::idempotency::Answer::with_seqs(StatusCode::ACCEPTED.as_u16(), "application/json", body)
}

/// Counts a durable batch's events (by tenant too), and notes the end of a
/// quota refusal.
pub(super) fn count_accepted(st: &SharedState, accepted: usize, tenants: &[(String, u32)]) {
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
            charge(st, &mut permit, n)?;
            buf.extend_from_slice(&data);
        }
        Ok((buf, permit))
    };
    let r = tokio::time::timeout(Duration::from_millis(timeout_ms), read)
        .await
        .map_err(|_| AppError::BodyTimeout(timeout_ms))?;
    if r.is_ok() && st.shedding.swap(false, Ordering::Relaxed) {
        tracing::info!("in-flight byte budget has room again: accepting bodies");
    }
    r
}

/// Takes `n` more bytes of the in-flight budget, or sheds the request. The
/// first refusal after a success is logged; every one is counted.
fn charge(
    st: &SharedState,
    permit: &mut Option<OwnedSemaphorePermit>,
    n: u32,
) -> Result<(), AppError> {
    let Ok(more) = st.inflight.clone().try_acquire_many_owned(n) else {
        st.counters.requests_shed.fetch_add(1, Ordering::Relaxed);
        if !st.shedding.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = st.limits.max_inflight_bytes,
                "in-flight byte limit reached: shedding requests with 503 until bodies drain"
            );
        }
        return Err(AppError::Overloaded);
    };
    match permit {
        Some(p) => p.merge(more),
        None => *permit = Some(more),
    }
    Ok(())
}

/// Every `Content-Encoding` line joined into one list, as RFC 9110 reads
/// repeated fields, matched case-insensitively.
fn content_codings(headers: &axum::http::HeaderMap) -> Result<Vec<Coding>, AppError> {
    let mut values = Vec::new();
    for v in headers.get_all(header::CONTENT_ENCODING) {
        values.push(
            v.to_str().map_err(|_| {
                AppError::UnsupportedMediaType("Content-Encoding is not ASCII".into())
            })?,
        );
    }
    Coding::parse_list(values).map_err(AppError::UnsupportedMediaType)
}

/// Undoes the codings within `max-body-bytes`, charging the in-flight budget
/// as the output grows. On the request's own task, yielding every megabyte:
/// a blocking-pool thread would keep its own allocator heap per request.
async fn decode(
    st: &SharedState,
    mut bytes: Vec<u8>,
    codings: &[Coding],
    mut permit: Option<OwnedSemaphorePermit>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), AppError> {
    let limit = st.limits.max_body_bytes;
    let mut overloaded = false;
    let mut chunk = vec![0u8; decode::CHUNK];
    for &coding in codings.iter().rev() {
        let mut out = Vec::new();
        {
            let mut r = decode::reader_capped(
                coding,
                &bytes,
                limit,
                st.limits.max_events_per_request as u64,
            )
            .map_err(|e| decode_error(e, limit))?;
            let mut charge = |n: usize| {
                let ok = charge(st, &mut permit, n as u32).is_ok();
                overloaded |= !ok;
                ok
            };
            for i in 0u32.. {
                match decode::read_chunk(&mut r, coding, &mut out, &mut chunk, limit, &mut charge) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) if overloaded => return Err(AppError::Overloaded),
                    Err(e) => return Err(decode_error(e, limit)),
                }
                if i % 16 == 15 {
                    tokio::task::yield_now().await;
                }
            }
        }
        bytes = out;
    }
    Ok((bytes, permit))
}

fn decode_error(e: DecodeError, limit: u64) -> AppError {
    match e {
        DecodeError::TooLarge => AppError::BodyTooLarge(limit),
        DecodeError::Invalid(m) => AppError::BadRequest(m),
    }
}
