//! The HTTP API: `fn app(state) -> Router`, so tests drive it with `oneshot`
//! and `server.rs` serves it.

pub mod config;
mod error;
mod handlers;
pub mod listener;
pub mod tls;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
use crate::ingest::Normalizer;
use crate::replay::offsets::OffsetStore;
use crate::replay::ReplayStats;
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
}

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
    pub replay: Arc<ReplayStats>,
    /// Whether the last append was refused for quota, to log the change once.
    pub(crate) quota_refusing: AtomicBool,
    /// Whether the last body was refused for the in-flight byte budget, to
    /// log the change once.
    pub(crate) shedding: AtomicBool,
    /// API keys; `None` when auth is disabled.
    pub keys: Option<Arc<KeyStore>>,
    pub rates: Rates,
}

impl AppState {
    /// State without API keys (auth disabled); see [`AppState::with_keys`].
    pub fn new(config: impl Into<StateConfig>, wal: Arc<Wal>, offsets: Arc<OffsetStore>) -> Self {
        Self::with_keys(config, wal, offsets, None)
    }

    pub fn with_keys(
        config: impl Into<StateConfig>,
        wal: Arc<Wal>,
        offsets: Arc<OffsetStore>,
        keys: Option<Arc<KeyStore>>,
    ) -> Self {
        let config: StateConfig = config.into();
        let permits = usize::try_from(config.limits.max_inflight_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let counters = Arc::new(IngestCounters::default());
        let replay = Arc::new(ReplayStats::default());
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
        replay.set_observer(metrics.clone());
        if let Some(k) = &keys {
            metrics.auth_keys.set(k.len() as i64);
        }
        AppState {
            wal,
            offsets,
            normalizer: Normalizer::new(config.limits.clone(), config.events),
            limits: config.limits,
            http: config.http,
            inflight,
            shutting_down: AtomicBool::new(false),
            fatal: Notify::new(),
            counters,
            metrics,
            replay,
            quota_refusing: AtomicBool::new(false),
            shedding: AtomicBool::new(false),
            keys,
            rates: Rates::new(&config.rates),
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
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::head_limit,
        ))
        .layer(CatchPanicLayer::custom(error::panic_response))
        // 5xx are logged by the code that decides them, once per state
        // change (quota, shedding, WAL failure), not once per response.
        .layer(TraceLayer::new_for_http().on_failure(()))
        .with_state(state)
}
