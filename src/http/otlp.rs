//! `POST /v1/logs`: OTLP/HTTP logs. The same stages as `/v1/events` (admit,
//! read and decode, Idempotency-Key gate, parse, rate, append, answer after
//! the fdatasync); only the body format and the answers differ:
//!
//! - success: 200 with an `ExportLogsServiceResponse` in the request's
//!   encoding, `partial_success` set when some records were rejected. 200,
//!   not 202: OTLP exporters treat every 2xx alike, and the spec says 200;
//!   it is still sent only once the accepted records are fsynced.
//! - failure: the status `/v1/events` would give (400, 401, 403, 413, 415,
//!   429 and 503 with Retry-After, ...) with a `google.rpc.Status` body in
//!   the request's encoding (protobuf when the type was not understood).
//! - an empty request (no records) is a success, as the spec asks.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceResponse,
};
use prost::Message as _;

use super::ingest as stages;
use super::{AppError, SharedState};
use crate::idempotency::{Answer, Protocol};
use crate::ingest::otlp::{self, Encoding, OtlpError};
use crate::ingest::{self, Rejection};
use crate::streams::Stream;
use crate::wal::SeqRange;
use std::sync::Arc;

/// Rejections quoted in `partial_success.error_message`; the rest are
/// counted.
const QUOTED_REJECTIONS: usize = 5;

/// The OTLP logs route, under the request deadline.
/// The route belongs to a stream (the default one unless a `[[streams]]`
/// entry claims `/v1/logs`): its schema, tenants, rates, Idempotency-Key
/// scope and topics apply.
pub async fn logs(State(st): State<SharedState>, stream: Arc<Stream>, req: Request) -> Response {
    st.counters.requests.fetch_add(1, Ordering::Relaxed);
    // The encoding of every answer, errors included; unknown types get
    // protobuf, OTLP's default.
    let encoding = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| Encoding::from_content_type(Some(ct)))
        .and_then(Result::ok)
        .unwrap_or(Encoding::Protobuf);
    let handed = AtomicBool::new(false);
    match stages::under_deadline(&st, &handed, accept(&st, &stream, req, &handed)).await {
        Ok(resp) => resp,
        Err(f) => f.into_response(encoding),
    }
}

/// A refusal: its status, message and Retry-After.
struct Failure {
    status: StatusCode,
    message: String,
    retry_after: Option<HeaderValue>,
    www_authenticate: Option<HeaderValue>,
}

impl From<AppError> for Failure {
    fn from(e: AppError) -> Failure {
        let message = e.to_string();
        // The shared mapping decides the status and headers (and logs).
        let resp = e.into_response();
        Failure {
            status: resp.status(),
            message,
            retry_after: resp.headers().get(header::RETRY_AFTER).cloned(),
            www_authenticate: resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
        }
    }
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            retry_after: None,
            www_authenticate: None,
        }
    }

    /// A `google.rpc.Status` in `encoding`; `code` is the gRPC code that
    /// matches the HTTP status (the spec lets clients ignore it).
    fn into_response(self, encoding: Encoding) -> Response {
        let code = grpc_code(self.status);
        let body = match encoding {
            Encoding::Protobuf => tonic_types::Status {
                code,
                message: self.message,
                details: Vec::new(),
            }
            .encode_to_vec(),
            // google.rpc.Status in proto3 JSON: `details` omitted when empty.
            Encoding::Json => {
                serde_json::to_vec(&serde_json::json!({ "code": code, "message": self.message }))
                    .unwrap_or_default()
            }
        };
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(encoding.content_type()),
        );
        if let Some(v) = self.retry_after {
            h.insert(header::RETRY_AFTER, v);
        }
        if let Some(v) = self.www_authenticate {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}

/// google.rpc.Code for an HTTP status (the usual gRPC-HTTP mapping).
fn grpc_code(status: StatusCode) -> i32 {
    match status.as_u16() {
        400 | 413 | 415 => 3, // INVALID_ARGUMENT
        401 => 16,            // UNAUTHENTICATED
        403 => 7,             // PERMISSION_DENIED
        404 => 12,            // UNIMPLEMENTED
        408 => 4,             // DEADLINE_EXCEEDED
        409 => 10,            // ABORTED
        429 => 8,             // RESOURCE_EXHAUSTED
        503 => 14,            // UNAVAILABLE
        _ => 2,               // UNKNOWN
    }
}

/// One OTLP request, stage by stage; the stages are `/v1/events`'s.
async fn accept(
    st: &SharedState,
    stream: &Arc<Stream>,
    req: Request,
    handed: &AtomicBool,
) -> Result<Response, Failure> {
    let (parts, body) = req.into_parts();
    let admitted = stages::admit(st, &parts.headers, Encoding::from_content_type)?;
    stages::rate_check(st, stream.rates.check_request(&stream.name), &[])?;
    let encoding = admitted.format;
    let (bytes, permit) = stages::read_and_decode(st, body, &admitted).await?;
    let keyed = match super::idempotent::gate(
        st,
        &parts.headers,
        admitted.key.as_ref().map(|k| k.name.as_str()),
        &stream.name,
        &bytes,
        match encoding {
            Encoding::Protobuf => Protocol::OtlpProtobuf,
            Encoding::Json => Protocol::OtlpJson,
        },
    )? {
        super::idempotent::Gate::Proceed(keyed) => keyed,
        super::idempotent::Gate::Answer(resp) => return replayed(resp).await,
    };
    let batch = parse(st, stream, bytes, encoding, admitted.scope).await?;
    let rejected = stages::count_rejections(st, &batch);
    st.metrics
        .stream_events(stream, "rejected", rejected as u64);
    if batch.accepted.is_empty() {
        if rejected == 0 {
            // An empty request: success, nothing to store.
            let a = success(encoding, 0, &[]);
            return Ok(super::idempotent::answer(a.status, &a.content_type, a.body));
        }
        return Err(nothing_accepted(&batch));
    }
    let tenants = batch.tenant_counts();
    let decision = st
        .rates
        .check_batch(admitted.key.as_ref().map(|k| k.name.as_str()), &tenants);
    stages::rate_check(st, decision, &tenants)?;
    let accepted = batch.accepted.len();
    stages::rate_check(
        st,
        stream
            .rates
            .check_events(&stream.name, u32::try_from(accepted).unwrap_or(u32::MAX)),
        &tenants,
    )?;
    let payloads = batch.accepted.into_iter().map(|e| e.payload).collect();
    // The answer, sent below and, with a key, stored for the replay (then
    // its quoted rejections cut to fit 2 KiB, in both).
    let answer = match keyed {
        None => success(encoding, rejected, &batch.rejected),
        Some(_) => super::idempotent::fitted(batch.rejected.len(), |n| {
            success(encoding, rejected, &batch.rejected[..n])
        }),
    };
    let keyed = keyed.map(|k| (k, answer.clone()));
    let range: SeqRange = stages::append(st, payloads, keyed, handed).await?;
    drop(permit);
    st.metrics
        .stream_events(stream, "accepted", accepted as u64);
    stages::count_accepted(st, accepted, &tenants);
    Ok(super::idempotent::answer(
        answer.status,
        &answer.content_type,
        answer.render(range),
    ))
}

/// Decodes and normalizes the records; a large body on the blocking pool.
async fn parse(
    st: &SharedState,
    stream: &Arc<Stream>,
    bytes: Vec<u8>,
    encoding: Encoding,
    scope: crate::auth::TenantScope,
) -> Result<ingest::Batch, Failure> {
    let received_at = stages::received_now();
    let len = bytes.len();
    let state = st.clone();
    let stream = stream.clone();
    let parse = move || {
        otlp::prepare(
            encoding,
            &bytes,
            &state.limits,
            &stream.normalizer,
            &state.otlp,
            received_at,
            &scope,
        )
    };
    let result = stages::run_parse(len, parse)
        .await
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e))?;
    result.map_err(|e| {
        let status = match e {
            OtlpError::Malformed(_) => StatusCode::BAD_REQUEST,
            OtlpError::TooManyRecords(_)
            | OtlpError::TooManyMessages(_)
            | OtlpError::Expanded(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        tracing::debug!(%status, error = %e, "OTLP body refused");
        Failure::new(status, e.to_string())
    })
}

/// 413 when every record was too large, 403 when every one was forbidden,
/// else 400; the message quotes the first rejections.
fn nothing_accepted(batch: &ingest::Batch) -> Failure {
    let status = if batch.all_too_large() {
        StatusCode::PAYLOAD_TOO_LARGE
    } else if batch.all_forbidden() {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::BAD_REQUEST
    };
    Failure::new(status, summary(batch.rejected.len(), &batch.rejected))
}

/// "N log records rejected: record i: why; ..." quoting the first few of
/// `errors` (the first of the `rejected`).
fn summary(rejected: usize, errors: &[Rejection]) -> String {
    let mut s = format!("{rejected} log record(s) rejected");
    let quoted = errors.len().min(QUOTED_REJECTIONS);
    for (n, r) in errors[..quoted].iter().enumerate() {
        s.push_str(if n == 0 { ": " } else { "; " });
        s.push_str(&format!("record {}: {}", r.index, r.error));
    }
    if quoted > 0 && rejected > quoted {
        s.push_str(&format!("; and {} more", rejected - quoted));
    }
    s
}

/// The `ExportLogsServiceResponse` body: `partial_success` only when
/// something was rejected (the spec: unset on full success).
fn response_body(encoding: Encoding, rejected: usize, errors: &[Rejection]) -> Vec<u8> {
    let response = ExportLogsServiceResponse {
        partial_success: (rejected > 0).then(|| ExportLogsPartialSuccess {
            rejected_log_records: rejected as i64,
            error_message: summary(rejected, errors),
        }),
    };
    match encoding {
        Encoding::Protobuf => response.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&response).unwrap_or_default(),
    }
}

/// The 200 `ExportLogsServiceResponse` in the request's encoding (no
/// sequence numbers: OTLP answers carry none).
fn success(encoding: Encoding, rejected: usize, errors: &[Rejection]) -> Answer {
    Answer::exact(
        StatusCode::OK.as_u16(),
        encoding.content_type(),
        response_body(encoding, rejected, errors),
    )
}

/// The Idempotency-Key gate's own answers, in OTLP form: a stored answer is
/// replayed exactly as it was first sent (status, type, bytes); "still in
/// flight" becomes 503 with its Retry-After (409 is not retryable for OTLP
/// exporters, and the first request may yet fail); a different body, or a
/// key first used on another protocol, stays 422, as a `google.rpc.Status`.
async fn replayed(resp: Response) -> Result<Response, Failure> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_default();
    let status = if parts.status == StatusCode::CONFLICT {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        parts.status
    };
    Err(Failure {
        status,
        message,
        retry_after: parts.headers.get(header::RETRY_AFTER).cloned(),
        www_authenticate: None,
    })
}
