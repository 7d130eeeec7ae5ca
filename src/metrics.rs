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
use MetricType::{COUNTER, GAUGE};

use crate::ingest::IngestCounters;
use crate::replay::stall::StallCause;
use crate::replay::{FailureKind, Lag, ReplayObserver, ReplayStats};
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
    /// Events by stream and outcome. Stream names come from the
    /// configuration (at most `streams::MAX_STREAMS`), never from clients,
    /// so the label is bounded.
    pub stream_events_total: IntCounterVec,
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

/// Where the scrape-time values come from: the live counters the handlers,
/// the WAL and the replayer update. Built before the `AppState` and the
/// replayer, which share them.
#[derive(Clone)]
pub struct Sources {
    /// Distinct tenant label values (`rates.tenant-metrics-cap`).
    pub tenant_cap: usize,
    pub wal: Arc<Wal>,
    pub ingest: Arc<IngestCounters>,
    pub replay: Arc<ReplayStats>,
    /// Bytes of request bodies in memory, across requests (one permit = one byte).
    pub inflight: Arc<Semaphore>,
    pub max_inflight_bytes: u64,
}

impl Sources {
    /// Fresh counters over `wal`, with an in-flight budget of
    /// `max_inflight_bytes` (capped at what a semaphore can count).
    pub fn new(wal: Arc<Wal>, max_inflight_bytes: u64, tenant_cap: usize) -> Sources {
        let permits = usize::try_from(max_inflight_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Sources {
            tenant_cap,
            wal,
            ingest: Arc::default(),
            replay: Arc::default(),
            inflight: Arc::new(Semaphore::new(permits)),
            max_inflight_bytes: permits as u64,
        }
    }
}

/// Registers `m` in `registry` and returns it.
fn register<M: Collector + Clone + 'static>(registry: &Registry, m: M) -> prometheus::Result<M> {
    registry.register(Box::new(m.clone()))?;
    Ok(m)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

/// A histogram with `count` exponential buckets from `start`, doubling.
fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    start: f64,
    count: usize,
) -> prometheus::Result<Histogram> {
    let opts = HistogramOpts::new(name, help).buckets(exponential_buckets(start, 2.0, count)?);
    register(registry, Histogram::with_opts(opts)?)
}

impl Metrics {
    /// The registry over `src`, installed as the WAL's and the replayer's
    /// observer so fsync and delivery latencies reach it.
    pub fn install(src: &Sources) -> prometheus::Result<Arc<Metrics>> {
        let metrics = Metrics::new(src)?;
        src.wal.set_observer(metrics.clone());
        src.replay.set_observer(metrics.clone());
        Ok(metrics)
    }

    pub fn new(src: &Sources) -> prometheus::Result<Arc<Metrics>> {
        let r = Registry::new();
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_http_request_duration_seconds",
                "HTTP request duration by route; for ingest, the time to 202 (includes the fsync).",
            )
            .buckets(exponential_buckets(0.0001, 2.0, 18)?),
            &["route"],
        )?;
        let metrics = Metrics {
            http_requests: counter_vec(
                &r,
                "sluice_http_requests_total",
                "HTTP requests by route and status.",
                &["route", "status"],
            )?,
            http_duration: register(&r, http_duration)?,
            events_rejected: counter_vec(
                &r,
                "sluice_events_rejected_total",
                "Events rejected at validation, by reason.",
                &["reason"],
            )?,
            wal_fsync: histogram(
                &r,
                "sluice_wal_fsync_duration_seconds",
                "Duration of each group-commit fdatasync.",
                0.00005,
                18,
            )?,
            wal_group_records: histogram(
                &r,
                "sluice_wal_group_commit_records",
                "Records made durable by one fdatasync.",
                1.0,
                16,
            )?,
            kafka_delivery: histogram(
                &r,
                "sluice_kafka_delivery_duration_seconds",
                "Time from produce to Kafka's delivery report.",
                0.0005,
                18,
            )?,
            auth_failures: counter_vec(
                &r,
                "sluice_auth_failures_total",
                "Ingest requests refused with 401, by reason (missing, malformed, unknown).",
                &["reason"],
            )?,
            auth_keys: register(&r, IntGauge::new("sluice_auth_keys", "API keys loaded.")?)?,
            auth_reloads: counter_vec(
                &r,
                "sluice_auth_reloads_total",
                "Reloads of the keys file by result (ok, error); on error the previous keys stay.",
                &["result"],
            )?,
            rate_limited: counter_vec(
                &r,
                "sluice_rate_limited_requests_total",
                "Requests refused with 429 (or 413 when a batch exceeds a burst), by bucket scope (key, tenant, stream) and unit (requests, events).",
                &["scope", "unit"],
            )?,
            tenant_events: counter_vec(
                &r,
                "sluice_tenant_events_total",
                "Events by tenant (capped: the rest are `other`, untenanted ones `none`) and outcome (accepted, forbidden, rate_limited).",
                &["tenant", "outcome"],
            )?,
            tenants: TenantLabels::new(src.tenant_cap),
            stream_events_total: counter_vec(
                &r,
                "sluice_stream_events_total",
                "Events by stream (as configured) and outcome (accepted, rejected).",
                &["stream", "outcome"],
            )?,
            registry: r,
        };
        metrics.zero_known_labels();
        metrics.registry.register(Box::new(pulled(src)?))?;
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Arc::new(metrics))
    }

    /// Creates every known label value at 0, so that a fresh daemon
    /// already exposes the series: `rate()` and dashboard panels then show
    /// 0 instead of nothing until the first observation.
    fn zero_known_labels(&self) {
        for kind in crate::ingest::EventError::KINDS {
            self.events_rejected.with_label_values(&[kind]);
        }
        for reason in ["missing", "malformed", "unknown"] {
            self.auth_failures.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            self.auth_reloads.with_label_values(&[result]);
        }
        for scope in ["key", "tenant", "stream"] {
            for unit in ["requests", "events"] {
                self.rate_limited.with_label_values(&[scope, unit]);
            }
        }
    }

    /// Creates the per-stream series of every configured stream at 0.
    pub fn zero_streams<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            for outcome in ["accepted", "rejected"] {
                self.stream_events_total.with_label_values(&[name, outcome]);
            }
        }
    }

    /// Counts `n` events of `stream` with `outcome` (accepted, rejected).
    pub fn stream_events(&self, stream: &crate::streams::Stream, outcome: &str, n: u64) {
        if n > 0 {
            self.stream_events_total
                .with_label_values(&[stream.name.as_str(), outcome])
                .inc_by(n);
        }
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

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

/// One scrape-time metric: name (after `sluice_`), help, kind, and how to
/// read its value from its source `S`.
type Row<S> = (&'static str, &'static str, MetricType, fn(&S) -> f64);

/// A labelled one: its label name, and `(label value, sample)` pairs.
type LabelledRow<S> = (
    &'static str,
    &'static str,
    MetricType,
    &'static str,
    fn(&S) -> Vec<(&'static str, f64)>,
);

const INGEST: &[Row<IngestCounters>] = &[
    (
        "events_accepted_total",
        "Events accepted (fsynced and answered 202).",
        COUNTER,
        |i| get(&i.events_accepted),
    ),
    ("http_connections", "Open HTTP connections.", GAUGE, |i| {
        get(&i.connections_open)
    }),
    (
        "http_connections_refused_total",
        "Connections closed at once because http.max-connections were open.",
        COUNTER,
        |i| get(&i.connections_refused),
    ),
    (
        "requests_shed_total",
        "Requests answered 503 because limits.max-inflight-bytes of bodies were in memory.",
        COUNTER,
        |i| get(&i.requests_shed),
    ),
];

const WAL: &[Row<Wal>] = &[
    ("wal_appends_total", "Append requests made durable (one per accepted HTTP request).", COUNTER, |w| get(&w.counters().append_requests)),
    ("wal_records_total", "Records made durable.", COUNTER, |w| get(&w.counters().records)),
    ("wal_written_bytes_total", "Frame bytes written and fsynced.", COUNTER, |w| get(&w.counters().bytes)),
    ("wal_fsyncs_total", "Group-commit fdatasyncs.", COUNTER, |w| get(&w.counters().fsyncs)),
    ("wal_segments", "Segment files on disk.", GAUGE, |w| w.stats().segments as f64),
    ("wal_segments_created_total", "Segments created (rolls).", COUNTER, |w| get(&w.counters().segments_created)),
    ("wal_segments_removed_total", "Segments deleted by GC.", COUNTER, |w| get(&w.counters().segments_removed)),
    ("wal_disk_bytes", "Bytes of segments on disk.", GAUGE, |w| w.disk_bytes() as f64),
    ("wal_quota_bytes", "The WAL quota (wal.max-bytes).", GAUGE, |w| w.config().max_bytes as f64),
    ("disk_free_bytes", "Free bytes on the WAL's filesystem.", GAUGE, |w| w.free_bytes().map_or(f64::NAN, |b| b as f64)),
    ("disk_min_free_bytes", "Free space kept (wal.min-free-bytes).", GAUGE, |w| w.config().min_free_bytes as f64),
    ("wal_truncated_bytes_total", "Bytes cut at recovery: a torn tail of the last segment, or the damaged bytes of a frame inside it (the intact frames after it move to their own segment).", COUNTER, |w| get(&w.counters().truncated_bytes)),
    ("wal_lost_records_total", "Records found unreadable (corrupt or missing), counted once per range.", COUNTER, |w| get(&w.counters().lost_records)),
    ("wal_quarantined_files_total", "Damaged segments or tails copied to quarantine/.", COUNTER, |w| get(&w.counters().quarantined_files)),
    ("wal_quarantine_failures_total", "Damaged bytes recovery could not copy to quarantine/ (disk full); it started without them.", COUNTER, |w| get(&w.counters().quarantine_failures)),
    ("wal_failed", "1 once a write or fsync failed (sticky; the process exits to recover).", GAUGE, |w| flag(w.failure().is_some())),
    ("replay_last_seq", "Last durable sequence number.", GAUGE, |w| w.durable().borrow().next_seq.saturating_sub(1) as f64),
];

const WAL_LABELLED: &[LabelledRow<Wal>] = &[(
    "wal_refused_total",
    "Appends refused before touching the disk, by reason.",
    COUNTER,
    "reason",
    |w| {
        let c = w.counters();
        vec![
            ("full", get(&c.refused_full)),
            ("disk_low", get(&c.refused_disk_low)),
        ]
    },
)];

const REPLAY: &[Row<ReplayStats>] = &[
    ("replay_delivered_seq", "Every record at or below this is confirmed by Kafka.", GAUGE, |r| get(&r.delivered_through)),
    ("replay_committed_seq", "The committed offset flushed to disk.", GAUGE, |r| get(&r.committed)),
    ("replay_in_flight", "Records produced and awaiting a delivery report.", GAUGE, |r| get(&r.in_flight)),
    ("kafka_produced_total", "Records handed to the producer.", COUNTER, |r| get(&r.produced)),
    ("kafka_delivered_total", "Records confirmed by Kafka.", COUNTER, |r| get(&r.delivered)),
    ("replay_retries_total", "Failed deliveries that restarted replay from the last confirmed record.", COUNTER, |r| get(&r.retries)),
    ("replay_isolated_retries_total", "Records produced again alone after a permanent error on their request.", COUNTER, |r| get(&r.isolated_retries)),
    ("replay_partition_changes_total", "Times a topic's partition count changed and a new count was pinned from a sequence boundary.", COUNTER, |r| get(&r.partition_changes)),
    ("replay_partition_folds_total", "Records whose pinned partition no longer exists (the topic shrank) and went to another one.", COUNTER, |r| get(&r.partition_folds)),
    ("kafka_producer_recreations_total", "Producers rebuilt after a failure.", COUNTER, |r| get(&r.producer_recreations)),
    ("kafka_fatal_errors_total", "librdkafka fatal errors.", COUNTER, |r| get(&r.fatal_errors)),
    ("replay_gap_records_total", "Lost WAL records replay skipped (see wal_lost_records_total).", COUNTER, |r| get(&r.gap_records)),
    ("startup_read_failures_total", "Reads of the WAL or the offset store that failed during start-up (stream scan, Idempotency-Key rebuild) and were retried.", COUNTER, |_| crate::datadir::STARTUP_READ_FAILURES.load(std::sync::atomic::Ordering::Relaxed) as f64),
    ("instance_rotations_total", "Instance ids replaced at start because the WAL and the offset store held no sequence number (seq would start over at 1 under the old id).", COUNTER, |_| crate::instance::rotations() as f64),
    ("offset_store_resets_total", "Offset stores found unreadable or missing at start and moved to quarantine/ (replay restarted from the oldest segment).", COUNTER, |r| get(&r.offset_store_resets)),
    ("dead_letter_partial_lines_total", "Partial last lines of the dead-letter file (ENOSPC, kill) truncated before an append.", COUNTER, |r| get(&r.dead_letter_partial_lines)),
    ("sink_down", "Files sink: 1 while the archive writer is down (replay retries), else 0.", GAUGE, |r| flag(r.sink_down.load(Ordering::Relaxed))),
    ("sink_checkpointed_skipped_total", "Files sink: records found already in the archive checkpoint at start (killed before the offset flush) and not written again.", COUNTER, |r| get(&r.sink_checkpointed_skipped)),
    ("sink_fsync_failures_total", "Files sink: failed fsyncs of archive files, directories or the checkpoint; each stops the daemon (exit 1) so the restart reads the disk.", COUNTER, |r| get(&r.sink_fsync_failures)),
    ("sink_checkpoint_entries_dropped_total", "Files sink: archive checkpoint entries an open could not read (dropped after keeping a copy; their lines stay in their files).", COUNTER, |r| get(&r.sink_checkpoint_entries_dropped)),
    ("sink_fresh_archive_records_total", "Files sink: records delivered before a start found a new, empty archive directory (replaced, moved or lost); they are not in its files.", COUNTER, |r| get(&r.sink_fresh_archive_records)),
    ("sink_lines_total", "Files sink: lines written to the hourly files.", COUNTER, |r| get(&r.sink_lines)),
    ("sink_bytes_total", "Files sink: bytes written to the hourly files.", COUNTER, |r| get(&r.sink_bytes)),
    ("sink_fsyncs_total", "Files sink: fdatasyncs and fsyncs of files and directories.", COUNTER, |r| get(&r.sink_fsyncs)),
    ("sink_unparsed_total", "Files sink: records that were not JSON or had no usable timestamp (written to logs/unparsed/).", COUNTER, |r| get(&r.sink_unparsed)),
    ("sink_values_cut_total", "Files sink: analytics values longer than 256 bytes, counted under their cut form (marked \"…[cut]\").", COUNTER, |r| get(&r.sink_values_cut)),
    ("sink_files_sealed_over_bound_total", "Files sink: hours sealed because more than archive.max-open-hours were open (least recently written first).", COUNTER, |r| get(&r.sink_files_sealed_over_bound)),
    ("sink_events_far_past_total", "Files sink: events more than 7 days older than the clock (archived in their hour).", COUNTER, |r| get(&r.sink_events_far_past)),
    ("sink_events_far_future_total", "Files sink: events more than 1 hour ahead of the clock (archived in their hour).", COUNTER, |r| get(&r.sink_events_far_future)),
    ("sink_checkpoint_bytes", "Files sink: size of the archive checkpoint (main file and open hours' files) after the last commit, or as read at start.", GAUGE, |r| get(&r.sink_checkpoint_bytes)),
    ("sink_checkpoint_written_bytes", "Files sink: bytes the last commit wrote to the archive checkpoint (main file and the files of the hours that changed).", GAUGE, |r| get(&r.sink_checkpoint_written_bytes)),
    ("sink_checkpoint_over_bound_total", "Files sink: archive checkpoints read at start that were larger than the settings' bound (an older build or larger settings); read anyway.", COUNTER, |r| get(&r.sink_checkpoint_over_bound)),
    ("sink_files_open", "Files sink: hourly files open now.", GAUGE, |r| get(&r.sink_files_open)),
    ("sink_checkpoint_seconds", "Files sink: duration of the last commit (write, fdatasync, checkpoint).", GAUGE, |r| r.sink_commit_micros.load(Ordering::Relaxed) as f64 / 1e6),
    ("kafka_connected", "1 when the last delivery succeeded, 0 after all brokers went down or a delivery failed.", GAUGE, |r| flag(r.connected.load(Ordering::Relaxed))),
];

const REPLAY_LABELLED: &[LabelledRow<ReplayStats>] = &[
    (
        "replay_stalls_total",
        "Stalls (records in flight and no delivery report for kafka.message-timeout-ms), by what the cluster showed: not_enough_replicas (ISR below min.insync.replicas), no_leader, metadata_unavailable, no_delivery_report (nothing wrong in the metadata).",
        COUNTER,
        "cause",
        |r| {
            StallCause::ALL
                .iter()
                .map(|c| (c.label(), get(&r.stalls[c.index()])))
                .collect()
        },
    ),
    (
        "replay_stalled",
        "1 for the cause of the current stall (see replay_stalls_total), 0 for the others; all 0 once a delivery is confirmed again.",
        GAUGE,
        "cause",
        |r| {
            let now = r.stall().map(|(s, _)| s.cause);
            StallCause::ALL
                .iter()
                .map(|c| (c.label(), flag(now == Some(*c))))
                .collect()
        },
    ),
    (
        "dead_letter_total",
        "Records Kafka refused for good, by where they went.",
        COUNTER,
        "target",
        |r| {
            vec![
                ("topic", get(&r.dead_lettered_topic)),
                ("file", get(&r.dead_lettered_file)),
            ]
        },
    ),
    (
        "replay_failures_total",
        "Failed deliveries that restarted replay, by kind: authorization (ACLs, SASL), unknown_topic (deleted or never created), not_enough_replicas, stall (no report for kafka.message-timeout-ms, also for the reports still pending after another failure), tls (handshake failed), other.",
        COUNTER,
        "kind",
        |r| {
            FailureKind::ALL
                .iter()
                .map(|&k| (k.label(), get(&r.failures[k as usize])))
                .collect()
        },
    ),
];

/// Metrics that read more than one source.
const ACROSS: &[Row<Sources>] = &[
    (
        "inflight_body_bytes",
        "Request body bytes held in memory now.",
        GAUGE,
        |s| {
            s.max_inflight_bytes
                .saturating_sub(s.inflight.available_permits() as u64) as f64
        },
    ),
    (
        "replay_lag_records",
        "Durable records not yet confirmed by Kafka.",
        GAUGE,
        |s| Lag::of(&s.wal, &s.replay).records as f64,
    ),
    (
        "replay_lag_bytes",
        "Estimated bytes of durable records not yet confirmed (lag x average frame).",
        GAUGE,
        |s| Lag::of(&s.wal, &s.replay).bytes_estimate as f64,
    ),
];

fn pulled_item(
    name: &str,
    help: &str,
    kind: MetricType,
    label: Option<&str>,
    read: Read,
) -> prometheus::Result<Pulled> {
    let label_names: Vec<String> = label.into_iter().map(str::to_string).collect();
    let desc = Desc::new(
        format!("sluice_{name}"),
        help.to_string(),
        label_names.clone(),
        Default::default(),
    )?;
    Ok(Pulled {
        desc,
        kind,
        label_names,
        read,
    })
}

/// The rows of one source, each reading it through a clone of `src`.
fn rows<S: Send + Sync + 'static>(
    src: &Arc<S>,
    rows: &'static [Row<S>],
    labelled: &'static [LabelledRow<S>],
) -> prometheus::Result<Vec<Pulled>> {
    let mut out = Vec::new();
    for &(name, help, kind, read) in rows {
        let s = src.clone();
        out.push(pulled_item(
            name,
            help,
            kind,
            None,
            Box::new(move || vec![(Vec::new(), read(&s))]),
        )?);
    }
    for &(name, help, kind, label, read) in labelled {
        let s = src.clone();
        let samples = move || {
            read(&s)
                .into_iter()
                .map(|(v, x)| (vec![v.to_string()], x))
                .collect()
        };
        out.push(pulled_item(
            name,
            help,
            kind,
            Some(label),
            Box::new(samples),
        )?);
    }
    Ok(out)
}

fn pulled(src: &Sources) -> prometheus::Result<PulledCollector> {
    let mut items = rows(&src.ingest, INGEST, &[])?;
    items.extend(rows(&src.wal, WAL, WAL_LABELLED)?);
    items.extend(rows(&src.replay, REPLAY, REPLAY_LABELLED)?);
    items.extend(rows(&Arc::new(src.clone()), ACROSS, &[])?);
    Ok(PulledCollector { items })
}
