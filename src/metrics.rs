//! Prometheus metrics. Observations (HTTP requests, fsync latency, group
//! commit sizes, delivery latency) are prometheus vectors and histograms.
//! Everything else is read at scrape time from the atomic counters the WAL,
//! the ingest handler and the replayer already keep, so there is one source
//! of truth and `/stats` and `/metrics` always agree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
    Registry,
};
use tokio::sync::Semaphore;

use crate::ingest::IngestCounters;
use crate::replay::{Lag, ReplayObserver, ReplayStats};
use crate::wal::{Wal, WalObserver};

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub events_rejected: IntCounterVec,
    pub wal_fsync: Histogram,
    pub wal_group_records: Histogram,
    pub kafka_delivery: Histogram,
    pub auth_failures: IntCounterVec,
    pub auth_keys: IntGauge,
    pub auth_reloads: IntCounterVec,
    pub rate_limited: IntCounterVec,
    /// Events by tenant and outcome; label values capped by `tenants`.
    pub tenant_events: IntCounterVec,
    pub tenants: TenantLabels,
}

/// Bounds the cardinality of the `tenant` label: the first `cap` tenants
/// seen get their own series, every later one is counted as `other`. Tenant
/// ids are client input (a forbidden one too), so an unbounded label would
/// let a client grow the scrape without limit.
pub struct TenantLabels {
    cap: usize,
    seen: std::sync::RwLock<std::collections::HashSet<String>>,
}

impl TenantLabels {
    pub fn new(cap: usize) -> Self {
        TenantLabels {
            cap,
            seen: Default::default(),
        }
    }

    /// The label value for a tenant (`none` for events without one).
    pub fn label<'a>(&self, tenant: Option<&'a str>) -> &'a str {
        let Some(t) = tenant else { return "none" };
        if let Ok(seen) = self.seen.read() {
            if seen.contains(t) {
                return t;
            }
            if seen.len() >= self.cap {
                return "other";
            }
        }
        match self.seen.write() {
            Ok(mut seen) if seen.len() < self.cap || seen.contains(t) => {
                seen.insert(t.to_string());
                t
            }
            _ => "other",
        }
    }
}

impl WalObserver for Metrics {
    fn group_committed(&self, records: u64, _bytes: u64, fsync: Duration) {
        self.wal_fsync.observe(fsync.as_secs_f64());
        self.wal_group_records.observe(records as f64);
    }
}

impl ReplayObserver for Metrics {
    fn delivered(&self, latency: Duration) {
        self.kafka_delivery.observe(latency.as_secs_f64());
    }
}

/// Where the scrape-time values come from.
pub struct Sources {
    /// Distinct tenant label values (`rates.tenant-metrics-cap`).
    pub tenant_cap: usize,
    pub wal: Arc<Wal>,
    pub ingest: Arc<IngestCounters>,
    pub replay: Arc<ReplayStats>,
    pub inflight: Arc<Semaphore>,
    pub max_inflight_bytes: u64,
}

impl Metrics {
    pub fn new(src: Sources) -> prometheus::Result<Arc<Metrics>> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "sluice_http_requests_total",
                "HTTP requests by route and status.",
            ),
            &["route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_http_request_duration_seconds",
                "HTTP request duration by route; for ingest, the time to 202 (includes the fsync).",
            )
            .buckets(exponential_buckets(0.0001, 2.0, 18)?),
            &["route"],
        )?;
        let events_rejected = IntCounterVec::new(
            Opts::new(
                "sluice_events_rejected_total",
                "Events rejected at validation, by reason.",
            ),
            &["reason"],
        )?;
        let wal_fsync = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_wal_fsync_duration_seconds",
                "Duration of each group-commit fdatasync.",
            )
            .buckets(exponential_buckets(0.00005, 2.0, 18)?),
        )?;
        let wal_group_records = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_wal_group_commit_records",
                "Records made durable by one fdatasync.",
            )
            .buckets(exponential_buckets(1.0, 2.0, 16)?),
        )?;
        let delivery = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_kafka_delivery_duration_seconds",
                "Time from produce to Kafka's delivery report.",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 18)?),
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "sluice_auth_failures_total",
                "Ingest requests refused with 401, by reason (missing, malformed, unknown).",
            ),
            &["reason"],
        )?;
        let auth_keys = IntGauge::new("sluice_auth_keys", "API keys loaded.")?;
        let auth_reloads = IntCounterVec::new(
            Opts::new(
                "sluice_auth_reloads_total",
                "Reloads of the keys file by result (ok, error); on error the previous keys stay.",
            ),
            &["result"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "sluice_rate_limited_requests_total",
                "Requests refused with 429 (or 413 when a batch exceeds a burst), by bucket scope (key, tenant) and unit (requests, events).",
            ),
            &["scope", "unit"],
        )?;
        let tenant_events = IntCounterVec::new(
            Opts::new(
                "sluice_tenant_events_total",
                "Events by tenant (capped: the rest are `other`, untenanted ones `none`) and outcome (accepted, forbidden, rate_limited).",
            ),
            &["tenant", "outcome"],
        )?;
        for m in [&auth_failures, &auth_reloads, &rate_limited, &tenant_events] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(auth_keys.clone()))?;
        let tenants = TenantLabels::new(src.tenant_cap);
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(events_rejected.clone()))?;
        registry.register(Box::new(wal_fsync.clone()))?;
        registry.register(Box::new(wal_group_records.clone()))?;
        registry.register(Box::new(delivery.clone()))?;
        registry.register(Box::new(pulled(src)?))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Arc::new(Metrics {
            registry,
            http_requests,
            http_duration,
            events_rejected,
            wal_fsync,
            wal_group_records,
            kafka_delivery: delivery,
            auth_failures,
            auth_keys,
            auth_reloads,
            rate_limited,
            tenant_events,
            tenants,
        }))
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

type Read = Box<dyn Fn() -> Vec<(Vec<String>, f64)> + Send + Sync>;

/// A metric whose samples are read at scrape time.
struct Pulled {
    desc: Desc,
    kind: MetricType,
    label_names: Vec<String>,
    read: Read,
}

struct PulledCollector {
    items: Vec<Pulled>,
}

impl Collector for PulledCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.items.iter().map(|p| &p.desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.items
            .iter()
            .map(|p| {
                let mut mf = MetricFamily::default();
                mf.set_name(p.desc.fq_name.clone());
                mf.set_help(p.desc.help.clone());
                mf.set_field_type(p.kind);
                for (values, v) in (p.read)() {
                    let mut m = proto::Metric::default();
                    let labels = p
                        .label_names
                        .iter()
                        .zip(values)
                        .map(|(n, v)| {
                            let mut l = proto::LabelPair::default();
                            l.set_name(n.clone());
                            l.set_value(v);
                            l
                        })
                        .collect();
                    m.set_label(labels);
                    if p.kind == MetricType::COUNTER {
                        let mut c = proto::Counter::default();
                        c.set_value(v);
                        m.set_counter(c);
                    } else {
                        let mut g = proto::Gauge::default();
                        g.set_value(v);
                        m.set_gauge(g);
                    }
                    mf.mut_metric().push(m);
                }
                mf
            })
            .collect()
    }
}

fn get(a: &AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

fn pulled(src: Sources) -> prometheus::Result<PulledCollector> {
    let mut items = Vec::new();
    let mut add = |name: &str, help: &str, kind: MetricType, labels: &[&str], read: Read| {
        let desc = Desc::new(
            format!("sluice_{name}"),
            help.to_string(),
            labels.iter().map(|s| s.to_string()).collect(),
            Default::default(),
        )?;
        items.push(Pulled {
            desc,
            kind,
            label_names: labels.iter().map(|s| s.to_string()).collect(),
            read,
        });
        Ok::<_, prometheus::Error>(())
    };
    use MetricType::{COUNTER, GAUGE};
    macro_rules! one {
        ($src:expr, |$s:ident| $e:expr) => {{
            let $s = $src.clone();
            Box::new(move || vec![(Vec::new(), $e)]) as Read
        }};
    }
    let (w, i, r) = (&src.wal, &src.ingest, &src.replay);

    add(
        "events_accepted_total",
        "Events accepted (fsynced and answered 202).",
        COUNTER,
        &[],
        one!(i, |i| get(&i.events_accepted)),
    )?;
    add(
        "http_connections",
        "Open HTTP connections.",
        GAUGE,
        &[],
        one!(i, |i| get(&i.connections_open)),
    )?;
    add(
        "http_connections_refused_total",
        "Connections closed at once because http.max-connections were open.",
        COUNTER,
        &[],
        one!(i, |i| get(&i.connections_refused)),
    )?;
    add(
        "requests_shed_total",
        "Requests answered 503 because limits.max-inflight-bytes of bodies were in memory.",
        COUNTER,
        &[],
        one!(i, |i| get(&i.requests_shed)),
    )?;
    let (sem, max) = (src.inflight.clone(), src.max_inflight_bytes);
    add(
        "inflight_body_bytes",
        "Request body bytes held in memory now.",
        GAUGE,
        &[],
        Box::new(move || {
            vec![(
                Vec::new(),
                max.saturating_sub(sem.available_permits() as u64) as f64,
            )]
        }),
    )?;

    add(
        "wal_appends_total",
        "Append requests made durable (one per accepted HTTP request).",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().append_requests)),
    )?;
    add(
        "wal_records_total",
        "Records made durable.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().records)),
    )?;
    add(
        "wal_written_bytes_total",
        "Frame bytes written and fsynced.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().bytes)),
    )?;
    add(
        "wal_fsyncs_total",
        "Group-commit fdatasyncs.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().fsyncs)),
    )?;
    add(
        "wal_segments",
        "Segment files on disk.",
        GAUGE,
        &[],
        one!(w, |w| w.stats().segments as f64),
    )?;
    add(
        "wal_segments_created_total",
        "Segments created (rolls).",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().segments_created)),
    )?;
    add(
        "wal_segments_removed_total",
        "Segments deleted by GC.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().segments_removed)),
    )?;
    add(
        "wal_disk_bytes",
        "Bytes of segments on disk.",
        GAUGE,
        &[],
        one!(w, |w| w.disk_bytes() as f64),
    )?;
    add(
        "wal_quota_bytes",
        "The WAL quota (wal.max-bytes).",
        GAUGE,
        &[],
        one!(w, |w| w.config().max_bytes as f64),
    )?;
    add(
        "disk_free_bytes",
        "Free bytes on the WAL's filesystem.",
        GAUGE,
        &[],
        one!(w, |w| w.free_bytes().map_or(f64::NAN, |b| b as f64)),
    )?;
    add(
        "disk_min_free_bytes",
        "Free space kept (wal.min-free-bytes).",
        GAUGE,
        &[],
        one!(w, |w| w.config().min_free_bytes as f64),
    )?;
    let wr = w.clone();
    add(
        "wal_refused_total",
        "Appends refused before touching the disk, by reason.",
        COUNTER,
        &["reason"],
        Box::new(move || {
            let c = wr.counters();
            vec![
                (vec!["full".into()], get(&c.refused_full)),
                (vec!["disk_low".into()], get(&c.refused_disk_low)),
            ]
        }),
    )?;
    add(
        "wal_truncated_bytes_total",
        "Bytes cut from a torn tail at recovery.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().truncated_bytes)),
    )?;
    add(
        "wal_lost_records_total",
        "Records found unreadable (corrupt or missing), counted once per range.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().lost_records)),
    )?;
    add(
        "wal_quarantined_files_total",
        "Damaged segments or tails copied to quarantine/.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().quarantined_files)),
    )?;
    add(
        "wal_quarantine_failures_total",
        "Damaged bytes recovery could not copy to quarantine/ (disk full); it started without them.",
        COUNTER,
        &[],
        one!(w, |w| get(&w.counters().quarantine_failures)),
    )?;
    add(
        "wal_failed",
        "1 once a write or fsync failed (sticky; the process exits to recover).",
        GAUGE,
        &[],
        one!(w, |w| f64::from(u8::from(w.failure().is_some()))),
    )?;

    let (wl, rl) = (w.clone(), r.clone());
    add(
        "replay_lag_records",
        "Durable records not yet confirmed by Kafka.",
        GAUGE,
        &[],
        Box::new(move || vec![(Vec::new(), Lag::of(&wl, &rl).records as f64)]),
    )?;
    let (wl, rl) = (w.clone(), r.clone());
    add(
        "replay_lag_bytes",
        "Estimated bytes of durable records not yet confirmed (lag x average frame).",
        GAUGE,
        &[],
        Box::new(move || vec![(Vec::new(), Lag::of(&wl, &rl).bytes_estimate as f64)]),
    )?;
    add(
        "replay_last_seq",
        "Last durable sequence number.",
        GAUGE,
        &[],
        one!(w, |w| w.durable().borrow().next_seq.saturating_sub(1)
            as f64),
    )?;
    add(
        "replay_delivered_seq",
        "Every record at or below this is confirmed by Kafka.",
        GAUGE,
        &[],
        one!(r, |r| get(&r.delivered_through)),
    )?;
    add(
        "replay_committed_seq",
        "The committed offset flushed to disk.",
        GAUGE,
        &[],
        one!(r, |r| get(&r.committed)),
    )?;
    add(
        "replay_in_flight",
        "Records produced and awaiting a delivery report.",
        GAUGE,
        &[],
        one!(r, |r| get(&r.in_flight)),
    )?;
    add(
        "kafka_produced_total",
        "Records handed to the producer.",
        COUNTER,
        &[],
        one!(r, |r| get(&r.produced)),
    )?;
    add(
        "kafka_delivered_total",
        "Records confirmed by Kafka.",
        COUNTER,
        &[],
        one!(r, |r| get(&r.delivered)),
    )?;
    add(
        "replay_retries_total",
        "Failed deliveries that restarted replay from the last confirmed record.",
        COUNTER,
        &[],
        one!(r, |r| get(&r.retries)),
    )?;
    add(
        "replay_isolated_retries_total",
        "Records produced again alone after a permanent error on their request.",
        COUNTER,
        &[],
        one!(r, |r| get(&r.isolated_retries)),
    )?;
    add(
        "kafka_producer_recreations_total",
        "Producers rebuilt after a failure.",
        COUNTER,
        &[],
        one!(r, |r| get(&r.producer_recreations)),
    )?;
    add(
        "kafka_fatal_errors_total",
        "librdkafka fatal errors.",
        COUNTER,
        &[],
        one!(r, |r| get(&r.fatal_errors)),
    )?;
    let rd = r.clone();
    add(
        "dead_letter_total",
        "Records Kafka refused for good, by where they went.",
        COUNTER,
        &["target"],
        Box::new(move || {
            vec![
                (vec!["topic".into()], get(&rd.dead_lettered_topic)),
                (vec!["file".into()], get(&rd.dead_lettered_file)),
            ]
        }),
    )?;
    add(
        "replay_gap_records_total",
        "Lost WAL records replay skipped (see wal_lost_records_total).",
        COUNTER,
        &[],
        one!(r, |r| get(&r.gap_records)),
    )?;
    add(
        "offset_store_resets_total",
        "Offset stores found unreadable or missing at start and moved to quarantine/ (replay restarted from the oldest segment).",
        COUNTER,
        &[],
        one!(r, |r| get(&r.offset_store_resets)),
    )?;
    add(
        "dead_letter_partial_lines_total",
        "Partial last lines of the dead-letter file (ENOSPC, kill) truncated before an append.",
        COUNTER,
        &[],
        one!(r, |r| get(&r.dead_letter_partial_lines)),
    )?;
    add(
        "kafka_connected",
        "1 when the last delivery succeeded, 0 after all brokers went down or a delivery failed.",
        GAUGE,
        &[],
        one!(r, |r| f64::from(u8::from(
            r.connected.load(Ordering::Relaxed)
        ))),
    )?;
    Ok(PulledCollector { items })
}
