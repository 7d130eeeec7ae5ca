//! The HTTP side of `Idempotency-Key` (the index is `crate::idempotency`).
//!
//! - No header: the request behaves as if the feature did not exist.
//! - Seen and accepted within the window: the first answer exactly (status,
//!   `Content-Type`, body bytes) with `Idempotent-Replayed: true`; nothing
//!   is appended. Exactly, because the first answer is itself rendered from
//!   the stored [`Answer`], with no exception: a keyed answer is cut to
//!   [`idempotency::MAX_RESPONSE_BYTES`] before it is first sent (its counts
//!   kept, its per-record errors quoted only as far as they fit; see
//!   [`fitted`]), so the entry is bounded and the replay is the same bytes.
//! - Same key, different body: 422. Same key and body on another protocol
//!   (events vs OTLP, or the other OTLP encoding): 422 too, naming the
//!   protocol that used it. First request still running: 409 with
//!   `Retry-After: 1` (chosen over waiting: a waiting request would hold its
//!   connection and in-flight budget for as long as the first one's fsync,
//!   and the client retries anyway).
//! - A request that appends nothing (every event rejected, a refusal, a
//!   failure) stores nothing: a retry is validated and handled afresh.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{AppError, SharedState};
use crate::idempotency::{self, Answer, Begin, Entry, Pending, Protocol};
use crate::wal::{SeqRange, WalError};

/// A keyed request allowed to proceed.
pub(super) struct Keyed {
    pending: Pending,
    scope: [u8; 16],
    key: String,
    body_sha256: [u8; 32],
    protocol: Protocol,
}

pub(super) enum Gate {
    Proceed(Option<Keyed>),
    Answer(Response),
}

/// Decides from the header, the caller's scope, the protocol and the body.
pub(super) fn gate(
    st: &SharedState,
    headers: &HeaderMap,
    api_key_name: Option<&str>,
    stream: &str,
    body: &[u8],
    protocol: Protocol,
) -> Result<Gate, AppError> {
    let Some(raw) = headers.get(idempotency::REQUEST_HEADER) else {
        return Ok(Gate::Proceed(None));
    };
    let key = idempotency::parse_key(raw.as_bytes())
        .map_err(|why| AppError::BadRequest(why.to_string()))?;
    let scope = idempotency::scope_for(api_key_name, stream);
    let body_sha256 = idempotency::body_hash(body);
    Ok(match st.idempotency.begin(scope, &key, body_sha256, protocol) {
        Begin::New(pending) => Gate::Proceed(Some(Keyed {
            pending,
            scope,
            key,
            body_sha256,
            protocol,
        })),
        Begin::Replay {
            status,
            content_type,
            body,
        } => {
            let mut resp = answer(status, &content_type, body);
            resp.headers_mut().insert(
                idempotency::REPLAYED_HEADER,
                HeaderValue::from_static("true"),
            );
            Gate::Answer(resp)
        }
        Begin::Mismatch => Gate::Answer(
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({ "error": "this Idempotency-Key was already used with a different request body" })),
            )
                .into_response(),
        ),
        Begin::OtherProtocol { stored } => Gate::Answer(
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({ "error": format!(
                    "this Idempotency-Key was already used on {}; a key names one request, use a new key here",
                    stored.describe()
                ) })),
            )
                .into_response(),
        ),
        Begin::InFlight => {
            let mut resp = (
                StatusCode::CONFLICT,
                Json(json!({ "error": "a request with this Idempotency-Key is still being processed; retry after it has an answer" })),
            )
                .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            Gate::Answer(resp)
        }
    })
}

/// A response of exactly this status, `Content-Type` and body: a first
/// answer and its replays are built here from the same [`Answer`].
pub(super) fn answer(status: u16, content_type: &str, body: Vec<u8>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, body).into_response();
    let ct = HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    resp
}

/// Appends the batch with its key: the entry rides in the first record and
/// enters the index when the batch is durable. `stored` is the answer to
/// replay (its sequence numbers filled in later), the one sent first too
/// (see [`fitted`]).
pub(super) async fn append(
    st: &SharedState,
    mut payloads: Vec<Vec<u8>>,
    keyed: Keyed,
    stored: Answer,
) -> Result<SeqRange, WalError> {
    let entry = Entry {
        scope: keyed.scope,
        key: keyed.key,
        body_sha256: keyed.body_sha256,
        protocol: keyed.protocol,
        answer: stored,
        accepted_ms: chrono::Utc::now().timestamp_millis(),
        records: payloads.len() as u64,
    };
    let encoded = entry.encode();
    let accepted_ms = entry.accepted_ms;
    if let Some(first) = payloads.first_mut() {
        // The payload was encoded by us a moment ago; failing to walk it is
        // a bug, and the request then goes without its key (the payload is
        // untouched: `stamp` checks it whole before changing a byte).
        if let Err(why) = Pending::stamp(first, &encoded) {
            tracing::error!(error = %why, "cannot attach the idempotency entry");
            return st.wal.append(payloads).await;
        }
    }
    let pending = keyed.pending;
    st.wal
        .append_with(
            payloads,
            Box::new(move |range| pending.complete(encoded, accepted_ms, range)),
        )
        .await
}

/// The answer of a keyed request, sent first and stored for the replay:
/// `render(n)` is the answer quoting the first `n` of its `errors`
/// per-record errors; this is the one quoting the most whose body fits in
/// [`idempotency::MAX_RESPONSE_BYTES`] (the counts alone, `n = 0`, always
/// do). Without a key the caller renders all of them: nothing is stored.
///
/// Decision: cut the first answer rather than only the stored one, so that a
/// replay is the first answer byte for byte with no exception. A client that
/// needs every rejected record's error sends its batch without a key, or
/// smaller; the counts are always whole.
pub(super) fn fitted(errors: usize, render: impl Fn(usize) -> Answer) -> Answer {
    let fits = |a: &Answer| a.body.len() <= idempotency::MAX_RESPONSE_BYTES;
    // A quoted error is at least 8 bytes in any encoding: more than this
    // many never fit.
    let most = errors.min(idempotency::MAX_RESPONSE_BYTES / 8);
    let all = render(most);
    if fits(&all) {
        return all;
    }
    // The body grows with n: the largest n that fits, in [lo, hi).
    let (mut lo, mut hi, mut best) = (0, most, render(0));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let a = render(mid);
        if fits(&a) {
            (lo, best) = (mid, a);
        } else {
            hi = mid;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitted_quotes_the_most_errors_that_fit() {
        let render = |n: usize| Answer::exact(200, "text/plain", vec![b'e'; 100 + 50 * n]);
        let limit = idempotency::MAX_RESPONSE_BYTES;
        let most = (limit - 100) / 50;
        for errors in [0, 1, most - 1, most, most + 1, 10_000] {
            let a = fitted(errors, render);
            assert_eq!(a.body.len(), 100 + 50 * errors.min(most), "{errors} errors");
        }
        // Counts alone always: even when they do not fit.
        let huge = |n: usize| Answer::exact(200, "text/plain", vec![b'e'; limit + 1 + n]);
        assert_eq!(fitted(5, huge).body.len(), limit + 1);
    }
}
