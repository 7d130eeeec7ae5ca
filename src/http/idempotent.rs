//! The HTTP side of `Idempotency-Key` (the index is `crate::idempotency`).
//!
//! - No header: the request behaves as if the feature did not exist.
//! - Seen and accepted within the window: the stored status and body, with
//!   `Idempotent-Replayed: true`; nothing is appended.
//! - Same key, different body: 422. First request still running: 409 with
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
use crate::idempotency::{self, Begin, Entry, Pending};
use crate::wal::{SeqRange, WalError};

/// A keyed request allowed to proceed.
pub(super) struct Keyed {
    pending: Pending,
    scope: [u8; 16],
    key: String,
    body_sha256: [u8; 32],
}

pub(super) enum Gate {
    Proceed(Option<Keyed>),
    Answer(Response),
}

/// Decides from the header, the caller's scope and the body.
pub(super) fn gate(
    st: &SharedState,
    headers: &HeaderMap,
    api_key_name: Option<&str>,
    stream: &str,
    body: &[u8],
) -> Result<Gate, AppError> {
    let Some(raw) = headers.get(idempotency::REQUEST_HEADER) else {
        return Ok(Gate::Proceed(None));
    };
    let key = idempotency::parse_key(raw.as_bytes())
        .map_err(|why| AppError::BadRequest(why.to_string()))?;
    let scope = idempotency::scope_for(api_key_name, stream);
    let body_sha256 = idempotency::body_hash(body);
    Ok(match st.idempotency.begin(scope, &key, body_sha256) {
        Begin::New(pending) => Gate::Proceed(Some(Keyed {
            pending,
            scope,
            key,
            body_sha256,
        })),
        Begin::Replay { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
            let mut resp = (status, body).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(
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

/// Appends the batch with its key: the entry rides in the first record and
/// enters the index when the batch is durable. `response` is the 202 body
/// with null sequence numbers (cut to its counts if it is long).
pub(super) async fn append(
    st: &SharedState,
    mut payloads: Vec<Vec<u8>>,
    keyed: Keyed,
    response: Vec<u8>,
) -> Result<SeqRange, WalError> {
    let entry = Entry {
        scope: keyed.scope,
        key: keyed.key,
        body_sha256: keyed.body_sha256,
        status: StatusCode::ACCEPTED.as_u16(),
        response,
        accepted_ms: chrono::Utc::now().timestamp_millis(),
        records: payloads.len() as u64,
    };
    let encoded = entry.encode();
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
            Box::new(move |range| pending.complete(entry, encoded, range)),
        )
        .await
}

/// The stored form of a 202 body: the full body if short, else the same
/// object without its `errors` list.
pub(super) fn stored_response(full: Vec<u8>, without_errors: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    if full.len() <= idempotency::MAX_RESPONSE_BYTES {
        full
    } else {
        without_errors()
    }
}
