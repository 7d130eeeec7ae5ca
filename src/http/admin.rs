//! The admin listener (`http.admin-listen`): `/metrics`, `/stats`, `/health`
//! and `/ready` for the operator's scraper and probes, and, when
//! `http.profiling` is on, CPU profiles at `/debug/pprof/profile`. Plain HTTP
//! without keys, so it binds loopback by default (docs/security.md).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

use super::config::HttpConfig;
use super::{error, method_not_allowed, not_found, status, AppError, SharedState};
use crate::ingest::IngestCounters;

/// Longest profile one request may ask for. The profiler's signal handler
/// runs on every thread while it is on, so it is never left on for long.
pub const MAX_PROFILE_SECS: u64 = 60;
/// Go's default, so `go tool pprof http://host/debug/pprof/profile` behaves
/// the same against sluice.
pub const DEFAULT_PROFILE_SECS: u64 = 30;
/// Samples per second: not 100, so sampling does not run in lockstep with
/// 10 ms timers.
const PROFILE_HZ: i32 = 99;

/// Binds `http.admin-listen`; `None` when it is off. Called before anything
/// else is opened, so a taken port stops startup with its name.
pub async fn bind(cfg: &HttpConfig) -> std::io::Result<Option<TcpListener>> {
    let addr = cfg.admin_addr().map_err(std::io::Error::other)?;
    let Some(addr) = addr else { return Ok(None) };
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("http.admin-listen {addr}: {e}"),
        )),
    }
}

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/metrics", get(status::metrics))
        .route("/stats", get(status::stats))
        .route("/health", get(status::health))
        .route("/ready", get(status::ready))
        .route("/debug/pprof/profile", get(profile))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(error::panic_response))
        .with_state(state)
}

/// The running admin listener.
pub struct Admin {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves the admin router on `listener` with the ingest port's timeouts and
/// connection cap, but its own connection counters (so the ingest gauges
/// count clients only).
pub fn spawn(listener: TcpListener, state: SharedState) -> Admin {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a: SocketAddr| a.to_string());
    let exposed = listener.local_addr().is_ok_and(|a| !a.ip().is_loopback());
    if exposed {
        tracing::warn!(%addr, profiling = state.http.profiling, "admin listener on a non-loopback address: /metrics, /stats and (if enabled) CPU profiles need no key (docs/security.md)");
    } else {
        tracing::info!(%addr, profiling = state.http.profiling, "admin listener");
    }
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let cfg = state.http.clone();
    let app = router(state);
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        super::listener::serve(
            listener,
            app,
            &cfg,
            Arc::new(IngestCounters::default()),
            None,
            shutdown,
        )
        .await;
    });
    Admin { stop, task }
}

impl Admin {
    /// Stops accepting and waits for open requests. A profile in progress
    /// sees the daemon's shutdown flag within a tenth of a second and ends,
    /// so this does not wait out its `seconds`.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            tracing::warn!("admin listener did not finish within 5 s; abandoning it");
            task.abort();
        }
    }
}

/// The profiler is process-wide (one SIGPROF timer): one profile at a time.
static PROFILING: AtomicBool = AtomicBool::new(false);

/// Holds [`PROFILING`] for one profile; released on drop, also on panic.
struct ProfileSlot;

impl ProfileSlot {
    fn take() -> Option<ProfileSlot> {
        PROFILING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| ProfileSlot)
    }
}

impl Drop for ProfileSlot {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

#[derive(Debug, Deserialize)]
pub struct ProfileQuery {
    seconds: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// gzip'd pprof protobuf, as Go's `net/http/pprof` serves it.
    Pprof,
    /// A flame graph (inferno).
    Svg,
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn parse_query(q: &ProfileQuery) -> Result<(u64, Format), String> {
    let seconds = match q.seconds.as_deref().map(str::trim) {
        None | Some("") => DEFAULT_PROFILE_SECS,
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=MAX_PROFILE_SECS).contains(n))
            .ok_or_else(|| {
                format!("seconds must be a whole number from 1 to {MAX_PROFILE_SECS}, got {s:?}")
            })?,
    };
    let format = match q.format.as_deref().map(str::trim) {
        None | Some("") | Some("pprof") | Some("proto") => Format::Pprof,
        Some("svg") | Some("flamegraph") => Format::Svg,
        Some(other) => {
            return Err(format!(
                "format must be pprof (the default) or svg, got {other:?}"
            ))
        }
    };
    Ok((seconds, format))
}

/// `GET /debug/pprof/profile?seconds=N&format=pprof|svg`: samples the CPU for
/// N seconds, then answers with the profile.
pub async fn profile(
    State(st): State<SharedState>,
    query: Result<Query<ProfileQuery>, QueryRejection>,
) -> Response {
    if !st.http.profiling {
        return json_error(
            StatusCode::NOT_FOUND,
            "profiling is off: set http.profiling = true (or SLUICE_HTTP_PROFILING=true) and restart; see docs/security.md",
        );
    }
    let (seconds, format) = match query
        .map_err(|e| e.body_text())
        .and_then(|Query(q)| parse_query(&q))
    {
        Ok(v) => v,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, message),
    };
    let Some(slot) = ProfileSlot::take() else {
        return json_error(
            StatusCode::CONFLICT,
            "a profile is already being taken; one at a time, retry when it finishes",
        );
    };
    let st2 = st.clone();
    // Blocking thread: building the guard reads the loaded libraries, and
    // symbolizing the report takes seconds of CPU.
    let taken = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        take_profile(&st2, Duration::from_secs(seconds), format)
    })
    .await;
    match taken {
        Ok(Ok(p)) => p.into_response(),
        Ok(Err(ProfileError::ShuttingDown)) => AppError::ShuttingDown {
            retry_after: st.http.retry_after_secs,
        }
        .into_response(),
        Ok(Err(ProfileError::Profiler(e))) => {
            tracing::error!(error = %e, "CPU profile failed");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("CPU profile failed: {e}"),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "CPU profile task failed");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "CPU profile failed")
        }
    }
}

enum ProfileError {
    ShuttingDown,
    Profiler(String),
}

struct Profile {
    format: Format,
    body: Vec<u8>,
}

impl IntoResponse for Profile {
    fn into_response(self) -> Response {
        let (ct, disposition) = match self.format {
            Format::Pprof => (
                "application/octet-stream",
                "attachment; filename=\"profile\"",
            ),
            Format::Svg => ("image/svg+xml", "inline; filename=\"profile.svg\""),
        };
        (
            [
                (header::CONTENT_TYPE, ct),
                (header::CONTENT_DISPOSITION, disposition),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            self.body,
        )
            .into_response()
    }
}

fn take_profile(
    st: &SharedState,
    length: Duration,
    format: Format,
) -> Result<Profile, ProfileError> {
    let fail = |e: pprof::Error| ProfileError::Profiler(e.to_string());
    // The unwinder must not interrupt code that holds the locks it takes
    // itself (the loader's, the unwinder's): samples that land in these
    // libraries are dropped rather than risk a deadlock in the handler.
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(PROFILE_HZ)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(fail)?;
    tracing::info!(seconds = length.as_secs(), ?format, "CPU profile started");
    let started = Instant::now();
    while started.elapsed() < length {
        if st.shutting_down.load(Ordering::Relaxed) {
            return Err(ProfileError::ShuttingDown);
        }
        let left = length.saturating_sub(started.elapsed());
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
    // Symbolizing holds the profiler's lock, so the handler drops the samples
    // it would take meanwhile; then the guard stops the timer before encoding.
    let report = guard.report().build().map_err(fail)?;
    drop(guard);
    let samples: isize = report.data.values().sum();
    let body = match format {
        Format::Pprof => {
            use flate2::write::GzEncoder;
            use pprof::protos::Message;
            use std::io::Write;
            let raw = report.pprof().map_err(fail)?.encode_to_vec();
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&raw)
                .and_then(|()| gz.finish())
                .map_err(|e| ProfileError::Profiler(e.to_string()))?
        }
        // The flame-graph writer writes nothing for no samples: say so in
        // an SVG rather than answer 200 with an empty body.
        Format::Svg if samples == 0 => no_samples_svg(length),
        Format::Svg => {
            let mut svg = Vec::new();
            report.flamegraph(&mut svg).map_err(fail)?;
            svg
        }
    };
    tracing::info!(
        seconds = length.as_secs(),
        samples,
        bytes = body.len(),
        "CPU profile taken"
    );
    Ok(Profile { format, body })
}

fn no_samples_svg(length: Duration) -> Vec<u8> {
    format!(
        r#"<?xml version="1.0" standalone="no"?><svg version="1.1" width="1200" height="60" xmlns="http://www.w3.org/2000/svg"><text x="600" y="35" text-anchor="middle" font-family="Verdana" font-size="14">No CPU samples in {} s: sluice was idle.</text></svg>"#,
        length.as_secs()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(seconds: Option<&str>, format: Option<&str>) -> Result<(u64, Format), String> {
        parse_query(&ProfileQuery {
            seconds: seconds.map(Into::into),
            format: format.map(Into::into),
        })
    }

    #[test]
    fn profile_query_is_bounded() {
        assert_eq!(q(None, None), Ok((DEFAULT_PROFILE_SECS, Format::Pprof)));
        assert_eq!(q(Some("1"), Some("svg")), Ok((1, Format::Svg)));
        assert_eq!(q(Some("60"), Some("pprof")), Ok((60, Format::Pprof)));
        for bad in ["0", "61", "-1", "1.5", "lots", "99999999999999999999"] {
            let e = q(Some(bad), None).unwrap_err();
            assert!(e.contains("from 1 to 60"), "{bad}: {e}");
        }
        assert!(q(None, Some("png")).unwrap_err().contains("pprof"));
    }

    #[test]
    fn one_profile_slot_at_a_time() {
        let a = ProfileSlot::take().expect("free at first");
        assert!(ProfileSlot::take().is_none(), "taken while held");
        drop(a);
        assert!(ProfileSlot::take().is_some(), "free again after drop");
    }
}
