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
use crate::streams::{Stream, Streams};
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
    /// The HTTP metrics' handles per route, resolved once.
    pub(crate) route_metrics: RouteMetrics,
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
        let streams = Streams::resolve(
            &config.limits,
            &config.events,
            &config.kafka,
            &config.streams,
        );
        let route_metrics = RouteMetrics::new(
            endpoints(&streams, true)
                .into_iter()
                .map(|(path, _)| path.to_string()),
        );
        AppState {
            wal: sources.wal,
            offsets,
            streams,
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
            route_metrics,
        }
    }
}

pub type SharedState = Arc<AppState>;

/// Ingest paths: the canonical one and the aliases for clients of older
/// gateways.
pub use crate::streams::INGEST_PATHS;

pub use crate::streams::OTLP_LOGS_PATH;

/// What serves one path of the ingest listener.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint<'a> {
    /// A stream's JSON, NDJSON or CSV events (POST).
    Ingest(&'a Arc<Stream>),
    /// A stream's OTLP/HTTP logs (POST).
    OtlpLogs(&'a Arc<Stream>),
    /// `/stats` (GET).
    Stats,
    /// `/metrics` (GET).
    Metrics,
    /// `/v1/receipts/{seq}` (GET).
    Receipt,
    /// `/health` (GET).
    Health,
    /// `/ready` (GET).
    Ready,
}

/// Every path the ingest listener serves, with what serves it: each
/// stream's routes, then the status endpoints (`/stats` and `/metrics` only
/// when `metrics_on_ingest`). [`app`] registers exactly these; so does
/// [`route_table_router`], which tests and the `config_serve` fuzz target
/// build to show that every configuration `Config::validate` accepts gives
/// a router axum builds (axum panics on a path it refuses, e.g. `/:id`, or
/// on one registered twice for a method).
pub fn endpoints(streams: &Streams, metrics_on_ingest: bool) -> Vec<(&str, Endpoint<'_>)> {
    let mut all: Vec<(&str, Endpoint<'_>)> = streams
        .routes()
        .map(|(path, stream)| {
            let e = if path == OTLP_LOGS_PATH {
                Endpoint::OtlpLogs(stream)
            } else {
                Endpoint::Ingest(stream)
            };
            (path, e)
        })
        .collect();
    if metrics_on_ingest {
        all.push(("/stats", Endpoint::Stats));
        all.push(("/metrics", Endpoint::Metrics));
    }
    all.push(("/v1/receipts/{seq}", Endpoint::Receipt));
    all.push(("/health", Endpoint::Health));
    all.push(("/ready", Endpoint::Ready));
    all
}

/// A router over [`endpoints`] whose handlers do nothing: the same paths
/// and methods as [`app`]'s, built without state (no WAL, no data dir).
pub fn route_table_router(streams: &Streams, metrics_on_ingest: bool) -> Router {
    endpoints(streams, metrics_on_ingest)
        .into_iter()
        .fold(Router::new(), |router, (path, e)| {
            let noop = || async {};
            let handler = match e {
                Endpoint::Ingest(_) | Endpoint::OtlpLogs(_) => post(noop),
                _ => get(noop),
            };
            router.route(path, handler)
        })
}

pub fn app(state: SharedState) -> Router {
    let mut router = Router::new();
    // Each route's handler holds its stream, resolved once here: a request
    // never looks its stream up. Every ingest route (OTLP's too) waits for
    // the parsing budget before its body is read. The handler itself waits
    // for the budget (a middleware layer costs a boxed future and a service
    // clone per request).
    for (path, endpoint) in endpoints(&state.streams, state.http.metrics_on_ingest) {
        let handler = match endpoint {
            Endpoint::OtlpLogs(stream) => {
                let stream = stream.clone();
                post(move |st: State<SharedState>, req: Request| async move {
                    let _permit = parsing_budget(&st, req.headers()).await;
                    otlp::logs(st, stream, req).await
                })
            }
            Endpoint::Ingest(stream) => {
                let stream = stream.clone();
                post(move |st: State<SharedState>, req: Request| async move {
                    let _permit = parsing_budget(&st, req.headers()).await;
                    ingest::ingest(st, stream, req).await
                })
            }
            // Off unless `http.metrics-on-ingest`: only the admin listener
            // serves them then (404 here).
            Endpoint::Stats => get(status::stats),
            Endpoint::Metrics => get(status::metrics),
            Endpoint::Receipt => get(status::receipt),
            Endpoint::Health => get(status::health),
            Endpoint::Ready => get(status::ready),
        };
        router = router.route(path, handler);
    }
    // One middleware on every route checks the head and counts the request
    // (each layer costs a boxed future and a service clone per request;
    // three layers here were 7 % of a single-event request's CPU). The
    // fallbacks check the head themselves.
    let router = router
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(error::panic_response));
    // Per-request spans and debug events only when the log filter shows them
    // (`[log] level = "info,tower_http=debug"`; the filter is fixed at
    // start): the layer costs ~2 us per request even when filtered out (span,
    // response classifier, body wrapper), 6 % of a single-event request.
    // 5xx are logged by the code that decides them, once per state change
    // (quota, shedding, WAL failure), not once per response.
    let router = if tracing::enabled!(target: "tower_http::trace::on_response", tracing::Level::DEBUG)
    {
        router.layer(TraceLayer::new_for_http().on_failure(()))
    } else {
        router
    };
    router.with_state(state)
}

/// Any path that is not an endpoint.
pub async fn not_found(State(st): State<SharedState>, req: Request) -> Response {
    head_too_large(&st, &req).unwrap_or_else(|| AppError::NotFound.into_response())
}

/// A known path with the wrong method.
pub async fn method_not_allowed(State(st): State<SharedState>, req: Request) -> Response {
    head_too_large(&st, &req).unwrap_or_else(|| AppError::MethodNotAllowed.into_response())
}

/// Enforces `http.max-header-bytes` on the request head as sent: the request
/// line and every `name: value` line with their CRLFs. The HTTP parser's own
/// buffer limit is only a coarse guard above this.
fn head_too_large(st: &AppState, req: &Request) -> Option<Response> {
    let uri = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let mut size = req.method().as_str().len() + 1 + uri + 1 + "HTTP/1.1\r\n".len() + 2;
    for (k, v) in req.headers() {
        size += k.as_str().len() + 2 + v.as_bytes().len() + 2;
    }
    (size > st.http.max_header_bytes)
        .then(|| AppError::HeadTooLarge(st.http.max_header_bytes).into_response())
}

/// Statuses whose counters [`RouteMetrics`] keeps resolved; others are looked
/// up by label.
const TRACKED_STATUSES: [u16; 10] = [200, 202, 400, 401, 403, 404, 413, 429, 431, 503];

/// Handles of `sluice_http_requests_total` and
/// `sluice_http_request_duration_seconds` per route template, each resolved
/// on its first use (so /metrics shows only series that happened): a request
/// then costs a lookup of its route, not a label hash and a lock per metric.
pub(crate) struct RouteMetrics {
    routes: std::collections::HashMap<String, RouteHandles>,
}

struct RouteHandles {
    duration: std::sync::OnceLock<prometheus::Histogram>,
    statuses: [std::sync::OnceLock<prometheus::IntCounter>; TRACKED_STATUSES.len()],
}

impl RouteMetrics {
    fn new(routes: impl Iterator<Item = String>) -> Self {
        RouteMetrics {
            routes: routes
                .map(|r| {
                    let h = RouteHandles {
                        duration: std::sync::OnceLock::new(),
                        statuses: Default::default(),
                    };
                    (r, h)
                })
                .collect(),
        }
    }

    fn observe(
        &self,
        m: &Metrics,
        route: &str,
        status: axum::http::StatusCode,
        took: std::time::Duration,
    ) {
        let secs = took.as_secs_f64();
        let handles = self.routes.get(route);
        let slot = TRACKED_STATUSES.iter().position(|&s| s == status.as_u16());
        let count = || m.http_requests.with_label_values(&[route, status.as_str()]);
        match (handles, slot) {
            (Some(h), Some(i)) => h.statuses[i].get_or_init(count).inc(),
            _ => count().inc(),
        }
        let duration = || m.http_duration.with_label_values(&[route]);
        match handles {
            Some(h) => h.duration.get_or_init(duration).observe(secs),
            None => duration().observe(secs),
        }
    }
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

/// Waits until `limits.max-parsing-bytes` has room for a large request's
/// declared length, body unread; the caller holds the permit until the
/// response.
/// Memory under load grows with the bodies being worked on, not with the
/// connections: each one in progress holds its body, its parsed events and
/// their encoded records (about 7x the body with 1,000-event batches), and on
/// 2 cores a few at a time keep the parser, the writer and the disk busy.
/// A waiting request holds only what hyper read of it (its head and the
/// first few KiB); its body timeout starts once it runs. Unlike the
/// in-flight budget, which answers 503 at once, this one queues (fairly, in
/// arrival order).
pub async fn parsing_budget(
    st: &AppState,
    headers: &axum::http::HeaderMap,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let want = match declared {
        Some(n) if n <= SMALL_BODY_BYTES => return None,
        Some(n) => n,
        None => UNKNOWN_BODY_BYTES,
    };
    // At most the whole budget: a body larger than it runs alone.
    let want = parsing_permits(want.min(st.limits.max_parsing_bytes)) as u32;
    // The semaphore is never closed, so acquiring only waits.
    st.parsing.clone().acquire_many_owned(want).await.ok()
}

/// Refuses a head over `http.max-header-bytes` (431), then counts every
/// routed request by route template (bounded cardinality) and status, and
/// times it.
pub async fn track(
    State(st): State<SharedState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let resp = match head_too_large(&st, &req) {
        Some(refused) => refused,
        None => next.run(req).await,
    };
    let route = route.as_ref().map_or("unmatched", |p| p.as_str());
    st.route_metrics
        .observe(&st.metrics, route, resp.status(), started.elapsed());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::KafkaConfig;
    use crate::streams::StreamConfig;
    use proptest::prelude::*;

    fn stream(name: &str, routes: Vec<String>) -> StreamConfig {
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        StreamConfig::new(name, &routes, name)
    }

    /// Routes every stream validation accepts give a router axum builds
    /// (it panics on a path it refuses or on one registered twice); the
    /// routes are drawn from the characters axum and clients treat
    /// specially, and from the built-in and reserved paths.
    fn routes_build(sets: Vec<Vec<String>>) -> Result<(), TestCaseError> {
        let configs: Vec<StreamConfig> = sets
            .into_iter()
            .enumerate()
            .map(|(i, routes)| stream(&format!("s{i}"), routes))
            .collect();
        let k = KafkaConfig::default();
        if crate::streams::validate(&k, &configs).is_ok() {
            let streams =
                Streams::resolve(&Limits::default(), &EventsConfig::default(), &k, &configs);
            for on_ingest in [false, true] {
                let _ = route_table_router(&streams, on_ingest);
            }
        }
        Ok(())
    }

    fn route() -> impl Strategy<Value = String> {
        prop_oneof![
            "/[a-z:*{}%.~_/ü ?-]{0,8}",
            "(/[a:*{}.]{0,2}){1,4}/?",
            prop::sample::select(vec![
                "/",
                "/events",
                "/v1/logs",
                "/v1/events",
                "/health",
                "/v1/receipts/1",
                "/metrics/",
                "/stats",
                "/:id",
                "/{id}",
                "/*rest",
                "/{*rest}",
                "/a/",
            ])
            .prop_map(String::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn every_accepted_route_set_builds_a_router(
            sets in prop::collection::vec(prop::collection::vec(route(), 1..4), 0..4)
        ) {
            routes_build(sets)?;
        }
    }

    #[test]
    fn the_routes_that_crashed_serve_are_refused() {
        let k = KafkaConfig::default();
        for r in [
            "/:id", "/{id}", "/*x", "/a/{*x}", "/a}", "/ünï", "/a%41", "/a/../b",
        ] {
            let e = crate::streams::validate(&k, &[stream("a", vec![r.into()])]).unwrap_err();
            assert!(e.starts_with("streams.a.routes: "), "{r}: {e}");
        }
        // What they would do to the router, for the record.
        let built =
            std::panic::catch_unwind(|| Router::<()>::new().route("/:id", get(|| async {})));
        assert!(built.is_err(), "axum now takes /:id: relax check_route?");
    }
}
