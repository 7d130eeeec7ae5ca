//! Request-level errors and their one mapping to HTTP statuses. 4xx are the
//! client's problem and are logged at debug; 5xx are ours, logged with detail,
//! and the client gets only a generic sentence.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::ingest::BodyError;
use crate::wal::WalError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("body exceeds {0} bytes (after decompression)")]
    BodyTooLarge(u64),
    #[error("{0}")]
    Body(#[from] BodyError),
    #[error("could not read the request body: {0}")]
    BodyUnreadable(String),
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    #[error("{0}")]
    BadRequest(String),
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("request head exceeds {0} bytes (http.max-header-bytes)")]
    HeadTooLarge(usize),
    /// No key, an unusable header, or a key the server does not know. The
    /// message never echoes the key.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A token bucket is empty: come back after `retry_after` seconds.
    #[error("{message}")]
    RateLimited { message: String, retry_after: u64 },
    /// A batch larger than a bucket's burst: it could never pass; split it.
    #[error("{0}")]
    OverBurst(String),
    /// The request deadline passed while its batch was being made durable.
    #[error("request deadline of {ms} ms passed while the batch was being written; it may still be delivered, so a retry may duplicate it")]
    DeadlineAfterAppend { ms: u64, retry_after: u64 },
    /// The request deadline passed before anything was handed to the WAL.
    #[error("request deadline of {0} ms passed before the batch was written; nothing was stored")]
    DeadlineBeforeAppend(u64),
    /// Too many request bytes in flight across clients.
    #[error("server is at its in-flight byte limit; retry shortly")]
    Overloaded,
    #[error("server is shutting down; retry on another instance or after restart")]
    ShuttingDown { retry_after: u64 },
    /// WAL over quota or disk low: the client should come back later.
    #[error("{reason}; retry later")]
    StorageFull { reason: String, retry_after: u64 },
    /// The WAL failed (sticky); the process is restarting into recovery.
    #[error("storage failure; retry after restart or on another instance")]
    StorageFailed { detail: String, retry_after: u64 },
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        use AppError::*;
        match self {
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyTooLarge(_) | Body(BodyError::TooManyEvents(_)) | OverBurst(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            DeadlineBeforeAppend(_) => StatusCode::REQUEST_TIMEOUT,
            Body(_) | BodyUnreadable(_) | BadRequest(_) => StatusCode::BAD_REQUEST,
            BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Overloaded
            | ShuttingDown { .. }
            | StorageFull { .. }
            | StorageFailed { .. }
            | DeadlineAfterAppend { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            AppError::Overloaded => Some(1),
            AppError::ShuttingDown { retry_after }
            | AppError::StorageFull { retry_after, .. }
            | AppError::StorageFailed { retry_after, .. }
            | AppError::RateLimited { retry_after, .. }
            | AppError::DeadlineAfterAppend { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Maps a WAL refusal. Only `Io`/`Failed` are failures of ours.
    pub fn from_wal(e: WalError, retry_after: u64) -> AppError {
        match e {
            WalError::Full { .. } | WalError::DiskLow { .. } => AppError::StorageFull {
                reason: e.to_string(),
                retry_after,
            },
            WalError::Closed => AppError::ShuttingDown { retry_after },
            WalError::TooLarge { .. } => AppError::BadRequest(e.to_string()),
            WalError::Empty => AppError::BadRequest(e.to_string()),
            WalError::Io(_) | WalError::Failed(_) => AppError::StorageFailed {
                detail: e.to_string(),
                retry_after,
            },
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            AppError::StorageFailed { detail, .. } => {
                tracing::error!(%detail, "ingest refused: WAL failed");
            }
            e if status.is_server_error() => tracing::debug!(error = %e, "ingest refused"),
            e => tracing::debug!(%status, error = %e, "client error"),
        }
        let mut resp = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice\""),
            );
        }
        resp
    }
}

/// A panic in a handler is a bug: answer 500 without details and log it.
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(%detail, "handler panicked");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": "internal error" })),
    )
        .into_response()
}
