//! The HTTP API: `fn app(state) -> Router`, so tests drive it with `oneshot`
//! and `server.rs` serves it.

mod error;
mod handlers;
mod idempotent;
pub mod listener;
pub mod tls;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{Notify, Semaphore};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::trace::TraceLayer;

pub use error::AppError;

use crate::auth::{KeyStore, Rates};
use crate::config::{Config, HttpConfig, Limits};
use crate::ingest::Normalizer;
use crate::offsets::OffsetStore;
use crate::wal::Wal;

/// Everything the handlers share.
pub struct AppState {
    pub wal: Arc<Wal>,
    pub offsets: Arc<OffsetStore>,
    pub normalizer: Normalizer,
    pub limits: Limits,
    pub http: HttpConfig,
    /// Bytes of request bodies in memory, across requests (one permit = one byte).
    pub inflight: Arc<Semaphore>,
    /// Set when shutdown starts: new ingest requests get 503.
    pub shutting_down: AtomicBool,
    /// Notified when the WAL fails for good, so the process exits non-zero
    /// and systemd restarts it into recovery.
    pub fatal: Notify,
    pub counters: Arc<IngestCounters>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Replay and Kafka state, shared with the replayer.
    pub replay: Arc<crate::kafka::ReplayStats>,
    /// Whether the last append was refused for quota, to log the change once.
    pub(crate) quota_refusing: AtomicBool,
    /// API keys; `None` when auth is disabled.
    pub keys: Option<Arc<KeyStore>>,
    pub rates: Rates,
    /// Idempotency keys (empty until `serve` rebuilds it at open).
    pub idempotency: Arc<crate::idempotency::Index>,
}

/// Monotonic ingest counters.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub requests: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_rejected: AtomicU64,
    pub requests_refused: AtomicU64,
    /// Open HTTP connections (a gauge).
    pub connections_open: AtomicU64,
    /// Connections closed at once because `http.max-connections` were open.
    pub connections_refused: AtomicU64,
}

impl AppState {
    /// State without API keys (auth disabled); see [`AppState::with_keys`].
    pub fn new(config: &Config, wal: Arc<Wal>, offsets: Arc<OffsetStore>) -> Self {
        Self::with_keys(config, wal, offsets, None)
    }

    pub fn with_keys(
        config: &Config,
        wal: Arc<Wal>,
        offsets: Arc<OffsetStore>,
        keys: Option<Arc<KeyStore>>,
    ) -> Self {
        let permits = usize::try_from(config.limits.max_inflight_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let counters = Arc::new(IngestCounters::default());
        let replay = Arc::new(crate::kafka::ReplayStats::default());
        let inflight = Arc::new(Semaphore::new(permits));
        let metrics = crate::metrics::Metrics::new(crate::metrics::Sources {
            tenant_cap: config.rates.tenant_metrics_cap(),
            wal: wal.clone(),
            ingest: counters.clone(),
            replay: replay.clone(),
            inflight: inflight.clone(),
            max_inflight_bytes: permits as u64,
        })
        .expect("metric names and labels are static and unique");
        wal.set_observer(metrics.clone());
        if let Some(k) = &keys {
            metrics.auth_keys.set(k.len() as i64);
        }
        let idempotency = crate::idempotency::Index::new(config.idempotency.clone());
        // Registered once per state; a name clash is a bug, not an input.
        let _ = metrics
            .registry
            .register(Box::new(crate::idempotency::Collector(idempotency.clone())));
        AppState {
            wal,
            offsets,
            normalizer: Normalizer::new(config.limits.clone(), config.events.clone()),
            limits: config.limits.clone(),
            http: config.http.clone(),
            inflight,
            shutting_down: AtomicBool::new(false),
            fatal: Notify::new(),
            counters,
            metrics,
            replay,
            quota_refusing: AtomicBool::new(false),
            keys,
            rates: Rates::new(&config.rates),
            idempotency,
        }
    }
}

pub type SharedState = Arc<AppState>;

/// Ingest paths: the canonical one and the aliases for clients of older
/// gateways.
pub const INGEST_PATHS: [&str; 4] = ["/v1/events", "/ingest", "/events", "/logs"];

pub fn app(state: SharedState) -> Router {
    let mut router = Router::new();
    for path in INGEST_PATHS {
        router = router.route(path, post(handlers::ingest));
    }
    router
        .route("/v1/receipts/{seq}", get(handlers::receipt))
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/stats", get(handlers::stats))
        .route("/metrics", get(handlers::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::track,
        ))
        // Innermost first: the handler sees decompressed bytes, so every size
        // limit applies after decompression and a bomb is cut at the limit.
        .layer(RequestDecompressionLayer::new())
        .layer(CatchPanicLayer::custom(error::panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
