//! The HTTP API: `fn app(state) -> Router`, so tests drive it with `oneshot`
//! and `server.rs` serves it.

#[cfg(feature = "kafka")]
pub mod admin;
pub mod config;
mod error;
mod idempotent;
mod ingest;
pub mod listener;
mod otlp;
mod status;
pub mod tls;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{Notify, Semaphore};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use error::AppError;

pub use crate::ingest::IngestCounters;

use crate::auth::config::RatesConfig;
use crate::auth::{KeyStore, Rates};
use crate::ingest::config::{EventsConfig, Limits};
use crate::metrics::{Metrics, Sources};
use crate::replay::offsets::OffsetStore;
use crate::replay::ReplayStats;
use crate::streams::Streams;
use crate::wal::Wal;
use config::HttpConfig;

/// The sections of the configuration the HTTP layer uses (built from the
/// whole `Config` with `(&config).into()`).
#[derive(Debug, Clone)]
pub struct StateConfig {
    pub http: HttpConfig,
    pub limits: Limits,
    pub events: EventsConfig,
    pub rates: RatesConfig,
    pub idempotency: crate::idempotency::IdempotencyConfig,
    pub otlp: crate::ingest::otlp::OtlpConfig,
    /// For the default stream's topics.
    pub kafka: crate::replay::KafkaConfig,
    pub streams: Vec<crate::streams::StreamConfig>,
}

/// Everything the handlers share.
pub struct AppState {
    pub wal: Arc<Wal>,
    pub offsets: Arc<OffsetStore>,
    /// Every stream; each route's handler holds its own.
    pub streams: Streams,
    pub limits: Limits,
    pub http: HttpConfig,
    /// Bytes of request bodies in memory, across requests (one permit = one byte).
    pub inflight: Arc<Semaphore>,
    /// Declared bytes of large bodies being parsed and appended (one permit
    /// = one byte, `limits.max-parsing-bytes`); see [`parsing_budget`].
    pub parsing: Arc<Semaphore>,
    /// Set when shutdown starts: new ingest requests get 503.
    pub shutting_down: AtomicBool,
    /// Notified when the WAL fails for good, so the process exits non-zero
    /// and systemd restarts it into recovery.
    pub fatal: Notify,
    pub counters: Arc<IngestCounters>,
    pub metrics: Arc<Metrics>,
    /// Replay and Kafka state, shared with the replayer.
    pub replay: Arc<ReplayStats>,
    /// Whether the last append was refused for quota, to log the change once.
    pub(crate) quota_refusing: AtomicBool,
    /// Whether the last body was refused for the in-flight byte budget, to
    /// log the change once.
    pub(crate) shedding: AtomicBool,
    /// API keys; `None` when auth is disabled.
    pub keys: Option<Arc<KeyStore>>,
    pub rates: Rates,
    /// Idempotency keys (empty until `serve` rebuilds it at open).
    pub idempotency: Arc<crate::idempotency::Index>,
    /// The `[otlp]` section: how OTLP log records find their tenant.
    pub otlp: crate::ingest::otlp::OtlpConfig,
}

impl AppState {
    /// State without API keys (auth disabled); see [`AppState::with_keys`].
    pub fn new(config: impl Into<StateConfig>, wal: Arc<Wal>, offsets: Arc<OffsetStore>) -> Self {
        Self::with_keys(config, wal, offsets, None)
    }

    /// State with fresh counters and its own metrics registry, for callers
    /// (tests, benches) that do not share them; `server` builds both itself
    /// and calls [`AppState::assemble`].
    pub fn with_keys(
        config: impl Into<StateConfig>,
        wal: Arc<Wal>,
        offsets: Arc<OffsetStore>,
        keys: Option<Arc<KeyStore>>,
    ) -> Self {
        let config: StateConfig = config.into();
        let sources = Sources::new(
            wal,
            config.limits.max_inflight_bytes,
            config.rates.tenant_metrics_cap(),
        );
        let metrics =
            Metrics::install(&sources).expect("metric names and labels are static and unique");
        Self::assemble(config, sources, metrics, offsets, keys)
    }

    /// State over counters (`sources`) already shared with `metrics`.
    pub fn assemble(
        config: impl Into<StateConfig>,
        sources: Sources,
        metrics: Arc<Metrics>,
        offsets: Arc<OffsetStore>,
        keys: Option<Arc<KeyStore>>,
    ) -> Self {
        let config: StateConfig = config.into();
        if let Some(k) = &keys {
            metrics.auth_keys.set(k.len() as i64);
        }
        let idempotency = crate::idempotency::Index::new(config.idempotency.clone());
        // Registered once per state; a name clash is a bug, not an input.
        let _ = metrics
            .registry
            .register(Box::new(crate::idempotency::Collector(idempotency.clone())));
        let parsing = Arc::new(Semaphore::new(parsing_permits(
            config.limits.max_parsing_bytes,
        )));
        AppState {
            wal: sources.wal,
            offsets,
            streams: Streams::resolve(
                &config.limits,
                &config.events,
                &config.kafka,
                &config.streams,
            ),
            limits: config.limits,
            http: config.http,
            inflight: sources.inflight,
            parsing,
            shutting_down: AtomicBool::new(false),
            fatal: Notify::new(),
            counters: sources.ingest,
            metrics,
            replay: sources.replay,
            quota_refusing: AtomicBool::new(false),
            shedding: AtomicBool::new(false),
            keys,
            rates: Rates::new(&config.rates),
            idempotency,
            otlp: config.otlp,
        }
    }
}

pub type SharedState = Arc<AppState>;

/// Ingest paths: the canonical one and the aliases for clients of older
/// gateways.
pub use crate::streams::INGEST_PATHS;

pub use crate::streams::OTLP_LOGS_PATH;

pub fn app(state: SharedState) -> Router {
    let mut router = Router::new();
    // Each route's handler holds its stream, resolved once here: a request
    // never looks its stream up. Every ingest route (OTLP's too) waits for
    // the parsing budget before its body is read.
    for (path, stream) in state.streams.routes() {
        let stream = stream.clone();
        let handler = if path == OTLP_LOGS_PATH {
            post(move |st: State<SharedState>, req: Request| otlp::logs(st, stream, req))
        } else {
            post(move |st: State<SharedState>, req: Request| ingest::ingest(st, stream, req))
        };
        router = router.route(
            path,
            handler.route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                parsing_budget,
            )),
        );
    }
    // Off: only the admin listener serves them (404 here).
    if state.http.metrics_on_ingest {
        router = router
            .route("/stats", get(status::stats))
            .route("/metrics", get(status::metrics));
    }
    router
        .route("/v1/receipts/{seq}", get(status::receipt))
        .route("/health", get(status::health))
        .route("/ready", get(status::ready))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            head_limit,
        ))
        .layer(CatchPanicLayer::custom(error::panic_response))
        // 5xx are logged by the code that decides them, once per state
        // change (quota, shedding, WAL failure), not once per response.
        .layer(TraceLayer::new_for_http().on_failure(()))
        .with_state(state)
}

/// Any path that is not an endpoint.
pub async fn not_found() -> AppError {
    AppError::NotFound
}

/// A known path with the wrong method.
pub async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// Enforces `http.max-header-bytes` on the request head as sent: the request
/// line and every `name: value` line with their CRLFs. The HTTP parser's own
/// buffer limit is only a coarse guard above this.
pub async fn head_limit(
    State(st): State<SharedState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let uri = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let mut size = req.method().as_str().len() + 1 + uri + 1 + "HTTP/1.1\r\n".len() + 2;
    for (k, v) in req.headers() {
        size += k.as_str().len() + 2 + v.as_bytes().len() + 2;
    }
    if size > st.http.max_header_bytes {
        return AppError::HeadTooLarge(st.http.max_header_bytes).into_response();
    }
    next.run(req).await
}

/// Bodies up to this size take nothing from the parsing budget: they are
/// parsed on a worker thread and hold little memory, and group commit needs
/// many small appends at once to fill an fdatasync.
const SMALL_BODY_BYTES: u64 = 64 * 1024;
/// What a body of unknown length (chunked) takes from the parsing budget.
const UNKNOWN_BODY_BYTES: u64 = 1024 * 1024;

fn parsing_permits(bytes: u64) -> usize {
    // A semaphore counts at most MAX_PERMITS; acquire_many takes a u32.
    bytes
        .min(u64::from(u32::MAX))
        .min(Semaphore::MAX_PERMITS as u64) as usize
}

/// Holds a large request, body unread, until `limits.max-parsing-bytes` has
/// room for its declared length, and keeps that room until the response.
/// Memory under load grows with the bodies being worked on, not with the
/// connections: each one in progress holds its body, its parsed events and
/// their encoded records (about 7x the body with 1,000-event batches), and on
/// 2 cores a few at a time keep the parser, the writer and the disk busy.
/// A waiting request holds only what hyper read of it (its head and the
/// first few KiB); its body timeout starts once it runs. Unlike the
/// in-flight budget, which answers 503 at once, this one queues (fairly, in
/// arrival order).
pub async fn parsing_budget(
    State(st): State<SharedState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let want = match declared {
        Some(n) if n <= SMALL_BODY_BYTES => 0,
        Some(n) => n,
        None => UNKNOWN_BODY_BYTES,
    };
    // At most the whole budget: a body larger than it runs alone.
    let want = parsing_permits(want.min(st.limits.max_parsing_bytes)) as u32;
    let _permit = if want == 0 {
        None
    } else {
        // The semaphore is never closed, so acquiring only waits.
        st.parsing.clone().acquire_many_owned(want).await.ok()
    };
    next.run(req).await
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
