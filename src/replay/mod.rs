//! Replay: streams the durable WAL into Kafka and moves the committed offset.
//!
//! - [`replayer`]: the loop (read the WAL, produce, settle in order, commit).
//! - [`producer`]: producer config, error classification, connectivity and
//!   every Kafka header name; the one place the `kafka` feature gates.
//! - [`dead_letter`]: the last-resort file for records Kafka refuses.
//! - [`headers`]: which headers leave sluice, for every producer path.
//! - [`offsets`]: the committed offset (sled) and lost ranges.
//! - [`config`]: the `[kafka]` and `[replay]` sections.
//!
//! Replay reports through [`ReplayStats`] (atomics, read by `/stats` and
//! `/metrics`) and a [`ReplayObserver`], so it holds no metrics type.

pub mod config;
pub mod dead_letter;
#[cfg(feature = "kafka")]
pub mod files;
pub mod headers;
pub mod offsets;
pub mod partition;
pub mod producer;
#[cfg(feature = "kafka")]
pub mod replayer;
pub mod stall;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::wal::Wal;

pub use config::{KafkaConfig, ReplayConfig, SinkConfig, SinkKind};
#[cfg(feature = "kafka")]
pub use producer::{classify, producer_config, Failure, KafkaHealth};
pub use producer::{value_fit, ERROR_HEADER_MAX, LIBRDKAFKA_MESSAGE_MAX_BYTES};

/// Where a stream's records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub topic: String,
    pub dead_letter_topic: String,
}

/// Every configured stream's topics, by stream name: replay produces each
/// record to the topics of the stream it was accepted on.
#[derive(Debug, Clone, Default)]
pub struct StreamTopics(std::collections::HashMap<String, Topics>);

impl StreamTopics {
    /// Only the default stream, on `[kafka]`'s topics.
    pub fn default_only(kafka: &KafkaConfig) -> StreamTopics {
        let mut t = StreamTopics::default();
        t.insert(
            crate::wal::DEFAULT_STREAM,
            &kafka.topic,
            &kafka.dead_letter_topic,
        );
        t
    }

    pub fn insert(&mut self, stream: &str, topic: &str, dead_letter_topic: &str) {
        self.0.insert(
            stream.to_string(),
            Topics {
                topic: topic.to_string(),
                dead_letter_topic: dead_letter_topic.to_string(),
            },
        );
    }

    pub fn of(&self, stream: &str) -> Option<&Topics> {
        self.0.get(stream)
    }

    pub fn contains(&self, stream: &str) -> bool {
        self.0.contains_key(stream)
    }

    /// Every stream's topic (not the dead-letter topics), sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.values().map(|t| t.topic.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Every topic and dead-letter topic, for the dev broker.
    pub fn all_topics(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .values()
            .flat_map(|t| [t.topic.clone(), t.dead_letter_topic.clone()])
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Hears about replay events that are observations rather than counts (the
/// counts are atomics in [`ReplayStats`]), like `wal::WalObserver`.
pub trait ReplayObserver: Send + Sync {
    /// A delivery report arrived `latency` after its record was produced.
    fn delivered(&self, latency: Duration);
}

/// How far replay is behind the durable WAL, computed in one place for
/// `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// Last durable sequence number.
    pub last_seq: u64,
    pub delivered_through: u64,
    /// Durable records not yet confirmed by Kafka.
    pub records: u64,
    /// `records` times the WAL's average frame: an estimate.
    pub bytes_estimate: u64,
}

impl Lag {
    pub fn of(wal: &Wal, stats: &ReplayStats) -> Lag {
        let last_seq = wal.durable().borrow().next_seq.saturating_sub(1);
        let delivered_through = stats.delivered_through.load(Ordering::Relaxed);
        let records = last_seq.saturating_sub(delivered_through);
        let c = wal.counters();
        let avg = c.bytes.load(Ordering::Relaxed) / c.records.load(Ordering::Relaxed).max(1);
        Lag {
            last_seq,
            delivered_through,
            records,
            bytes_estimate: records * avg,
        }
    }
}

/// Why replay's deliveries failed, in a few kinds an operator acts on: a
/// metric label and a field of `/stats` and `/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The principal may not write the topic (ACLs), or SASL failed.
    Authorization,
    /// The topic (or a partition of it) does not exist: deleted, or never
    /// created.
    UnknownTopic,
    /// Fewer in-sync replicas than the topic's `min.insync.replicas`.
    NotEnoughReplicas,
    /// No delivery report for `kafka.message-timeout-ms` with records in
    /// flight.
    Stall,
    /// A TLS handshake with a broker failed (its certificate not trusted,
    /// its name not in the certificate).
    Tls,
    /// Anything else: brokers down, a fatal producer error, the WAL.
    Other,
}

impl FailureKind {
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Authorization,
        FailureKind::UnknownTopic,
        FailureKind::NotEnoughReplicas,
        FailureKind::Stall,
        FailureKind::Tls,
        FailureKind::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Authorization => "authorization",
            FailureKind::UnknownTopic => "unknown_topic",
            FailureKind::NotEnoughReplicas => "not_enough_replicas",
            FailureKind::Stall => "stall",
            FailureKind::Tls => "tls",
            FailureKind::Other => "other",
        }
    }

    /// The kind of a failure reason. Replay's reasons carry librdkafka's
    /// error code by its name (`Message production error:
    /// TopicAuthorizationFailed (...)`, `metadata for topic T:
    /// UnknownTopicOrPartition`, `Authentication: ... SASL authentication
    /// error`), or the words of the stall and of a failed TLS handshake.
    pub fn of(reason: &str) -> FailureKind {
        const KINDS: &[(&str, FailureKind)] = &[
            ("AuthorizationFailed", FailureKind::Authorization),
            ("Authentication", FailureKind::Authorization),
            ("UnknownTopic", FailureKind::UnknownTopic),
            ("UnknownPartition", FailureKind::UnknownTopic),
            ("NotEnoughReplicas", FailureKind::NotEnoughReplicas),
            ("no delivery report for", FailureKind::Stall),
            ("SSL handshake failed", FailureKind::Tls),
        ];
        KINDS
            .iter()
            .find(|(name, _)| reason.contains(name))
            .map_or(FailureKind::Other, |&(_, kind)| kind)
    }
}

/// The failure replay is backing off from (`ReplayStats::failing`).
#[derive(Debug, Clone)]
pub struct Failing {
    pub kind: FailureKind,
    /// The last failure's reason, as logged.
    pub reason: String,
    /// The first record replay produces again.
    pub from_seq: u64,
    /// The first failure since deliveries last succeeded.
    pub since: std::time::Instant,
    /// Failures since then.
    pub retries: u64,
    /// The last SASL or TLS error librdkafka reported for a broker
    /// connection meanwhile: the cause behind a metadata or transport
    /// failure.
    pub client_error: Option<String>,
}

/// Replay state shared with `/stats`, `/ready` and receipts.
#[derive(Debug, Default)]
pub struct ReplayStats {
    pub connected: AtomicBool,
    /// Highest sequence number with every record at or below it confirmed
    /// (in memory; `committed` is the flushed one).
    pub delivered_through: AtomicU64,
    pub committed: AtomicU64,
    pub produced: AtomicU64,
    pub delivered: AtomicU64,
    pub retries: AtomicU64,
    /// Records produced again alone after a permanent error on their batch.
    pub isolated_retries: AtomicU64,
    /// Topics whose partition count changed and got a new pin.
    pub partition_changes: AtomicU64,
    /// Records whose pinned partition no longer exists (topic shrunk).
    pub partition_folds: AtomicU64,
    pub producer_recreations: AtomicU64,
    /// librdkafka fatal errors seen (each recreates the producer).
    pub fatal_errors: AtomicU64,
    pub dead_lettered_topic: AtomicU64,
    pub dead_lettered_file: AtomicU64,
    pub gap_records: AtomicU64,
    /// Offset stores moved to quarantine at start (unreadable or missing).
    pub offset_store_resets: AtomicU64,
    /// Partial dead-letter lines (ENOSPC, kill) truncated before an append.
    pub dead_letter_partial_lines: AtomicU64,
    pub in_flight: AtomicU64,
    pub peak_in_flight: AtomicU64,
    /// Failed deliveries that restarted replay, by [`FailureKind`] (index).
    pub failures: [AtomicU64; FailureKind::ALL.len()],
    /// Why deliveries fail now: set by each failure, cleared when a
    /// delivery succeeds again. `/stats` and `/ready` show it.
    pub failing: std::sync::Mutex<Option<Failing>>,
    /// Files sink: set while the archive writer is down (a failed append,
    /// fsync or checkpoint; replay retries with back-off). `/ready` says so.
    pub sink_down: AtomicBool,
    /// Files sink: records already in the files' checkpoint when replay
    /// started above the committed offset (killed between the checkpoint
    /// and the offset flush): skipped, not lost.
    pub sink_checkpointed_skipped: AtomicU64,
    /// Files sink: failed fsyncs of the archive (each stops the daemon).
    pub sink_fsync_failures: AtomicU64,
    /// Files sink: checkpoint entries an open could not read and dropped.
    pub sink_checkpoint_entries_dropped: AtomicU64,
    /// Files sink: records delivered to an archive before the open found a
    /// new (empty) archive directory: not in these files.
    pub sink_fresh_archive_records: AtomicU64,
    /// Files sink: lines, bytes, fdatasyncs and unparsed records written,
    /// over every writer this process opened.
    pub sink_lines: AtomicU64,
    pub sink_bytes: AtomicU64,
    pub sink_fsyncs: AtomicU64,
    pub sink_unparsed: AtomicU64,
    /// Files sink (issue 26): tracked values cut to 256 bytes, hours
    /// sealed over `archive.max-open-hours`, events far from the clock,
    /// the last checkpoint's size, and checkpoints read at open that were
    /// larger than the settings' bound.
    pub sink_values_cut: AtomicU64,
    pub sink_files_sealed_over_bound: AtomicU64,
    pub sink_events_far_past: AtomicU64,
    pub sink_events_far_future: AtomicU64,
    pub sink_checkpoint_bytes: AtomicU64,
    pub sink_checkpoint_over_bound: AtomicU64,
    /// Files sink: bytes the last commit wrote to the checkpoint (its main
    /// file and the files of the hours that changed).
    pub sink_checkpoint_written_bytes: AtomicU64,
    /// Files sink: files open now, and the last commit's duration (µs).
    pub sink_files_open: AtomicU64,
    pub sink_commit_micros: AtomicU64,
    /// Why replay stalls now (no delivery report for
    /// `kafka.message-timeout-ms`), as the cluster showed it; cleared by the
    /// next confirmed delivery. `/stats`, `/ready`, `sluice_replay_stalled`.
    stall: std::sync::Mutex<Option<(stall::Stall, std::time::Instant)>>,
    /// Stalls diagnosed, by `StallCause::index`.
    pub stalls: [AtomicU64; 4],
    /// Who hears about each delivery report (metrics), when set.
    observer: ObserverSlot,
}

#[derive(Default)]
struct ObserverSlot(OnceLock<Arc<dyn ReplayObserver>>);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "observed"
        } else {
            "unobserved"
        })
    }
}

impl ReplayStats {
    /// Sets the observer once; a second call is ignored.
    pub fn set_observer(&self, observer: Arc<dyn ReplayObserver>) {
        let _ = self.observer.0.set(observer);
    }

    pub fn observer(&self) -> Option<Arc<dyn ReplayObserver>> {
        self.observer.0.get().cloned()
    }

    /// Records the diagnosis of a stall; the episode's start is kept while
    /// stalls follow each other without a delivery in between.
    pub fn set_stall(&self, s: stall::Stall) {
        self.stalls[s.cause.index()].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut cur) = self.stall.lock() {
            let since = cur
                .as_ref()
                .map_or_else(std::time::Instant::now, |(_, t)| *t);
            *cur = Some((s, since));
        }
    }

    /// The current stall and how long it has lasted, if replay is stalled.
    pub fn stall(&self) -> Option<(stall::Stall, Duration)> {
        self.stall
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|(s, t)| (s.clone(), t.elapsed())))
    }

    pub fn set_connected(&self, up: bool, why: &str) {
        if self.connected.swap(up, Ordering::Relaxed) != up {
            if up {
                if let Ok(mut s) = self.stall.lock() {
                    *s = None;
                }
                if let Ok(mut f) = self.failing.lock() {
                    *f = None;
                }
                tracing::info!("Kafka reachable: deliveries confirmed");
            } else {
                tracing::warn!(
                    reason = why,
                    kind = FailureKind::of(why).label(),
                    "Kafka deliveries failing: replay backs off; ingest continues until the WAL quota"
                );
            }
        }
    }

    /// A failure that ends an incarnation: replay produces again from
    /// `from_seq` after its backoff. Counted by kind; `/stats` shows it
    /// until a delivery succeeds.
    pub fn failed(&self, why: &str, from_seq: u64) {
        let mut kind = FailureKind::of(why);
        if let Ok(mut f) = self.failing.lock() {
            let since = f.as_ref().map_or_else(std::time::Instant::now, |f| f.since);
            let retries = f.as_ref().map_or(0, |f| f.retries) + 1;
            let client_error = f.as_ref().and_then(|f| f.client_error.clone());
            if kind == FailureKind::Other {
                kind = client_error.as_deref().map_or(kind, FailureKind::of);
            }
            *f = Some(Failing {
                kind,
                reason: why.to_string(),
                from_seq,
                since,
                retries,
                client_error,
            });
        }
        self.failures[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.set_connected(false, why);
    }

    /// A SASL or TLS error librdkafka reported for a broker connection.
    /// No delivery report says so (records wait in librdkafka's queue, and
    /// replay sees a transport failure or a stall), so `kafka.failing`
    /// carries it while no delivery succeeds.
    pub fn client_error(&self, what: &str) {
        if self.connected.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut f) = self.failing.lock() {
            let from_seq = self.delivered_through.load(Ordering::Relaxed) + 1;
            let entry = f.get_or_insert_with(|| Failing {
                kind: FailureKind::of(what),
                reason: what.to_string(),
                from_seq,
                since: std::time::Instant::now(),
                retries: 0,
                client_error: None,
            });
            if entry.kind == FailureKind::Other {
                entry.kind = FailureKind::of(what);
            }
            entry.client_error = Some(what.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FailureKind, ReplayStats};

    /// The reasons replay logged against Apache Kafka 4.4 (tests/apache-kafka:
    /// ACL removed, topic deleted), and reasons of the same form for the rest.
    #[test]
    fn failure_kinds_of_the_reasons_seen_on_apache_kafka() {
        let seen = [
            ("seq 10164: Message production error: TopicAuthorizationFailed (Broker: Topic authorization failed)", FailureKind::Authorization),
            ("metadata for topic events: TopicAuthorizationFailed", FailureKind::Authorization),
            ("seq 40824: Message production error: UnknownPartition (Local: Unknown partition)", FailureKind::UnknownTopic),
            ("metadata for topic events: UnknownTopicOrPartition", FailureKind::UnknownTopic),
            ("seq 7: Message production error: NotEnoughReplicas (Broker: Not enough in-sync replicas)", FailureKind::NotEnoughReplicas),
            ("no delivery report for 20000 ms with 512 records in flight", FailureKind::Stall),
            ("Authentication: sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512", FailureKind::Authorization),
            ("SSL: sasl_ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed", FailureKind::Tls),
            ("WAL read: Input/output error", FailureKind::Other),
        ];
        for (reason, kind) in seen {
            assert_eq!(FailureKind::of(reason), kind, "{reason}");
        }
    }

    #[test]
    fn failing_counts_by_kind_and_clears_when_a_delivery_succeeds() {
        let s = ReplayStats::default();
        s.set_connected(true, "");
        s.failed("metadata for topic events: TopicAuthorizationFailed", 11);
        s.failed("seq 11: Message production error: TopicAuthorizationFailed (Broker: Topic authorization failed)", 11);
        let f = s.failing.lock().unwrap().clone().unwrap();
        assert_eq!(
            (f.kind, f.from_seq, f.retries),
            (FailureKind::Authorization, 11, 2)
        );
        assert_eq!(
            s.failures[FailureKind::Authorization as usize]
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        s.set_connected(true, "");
        assert!(s.failing.lock().unwrap().is_none());
    }

    /// A stall sets both `failing` (kind `stall`) and, once the cluster was
    /// asked, `stall` (the cause); one confirmed delivery clears both.
    #[test]
    fn a_stall_is_a_failure_of_kind_stall_with_its_cause_and_both_clear() {
        use super::stall::{Stall, StallCause};
        let s = ReplayStats::default();
        s.set_connected(true, "");
        s.failed(
            "no delivery report for 10000 ms with 512 records in flight",
            7,
        );
        s.set_stall(Stall {
            cause: StallCause::NotEnoughReplicas,
            detail: "NOT_ENOUGH_REPLICAS: topic events partition(s) 0".into(),
        });
        let f = s.failing.lock().unwrap().clone().unwrap();
        assert_eq!(f.kind, FailureKind::Stall);
        assert_eq!(
            s.stall().map(|(st, _)| st.cause),
            Some(StallCause::NotEnoughReplicas)
        );
        s.set_connected(true, "");
        assert!(s.failing.lock().unwrap().is_none());
        assert!(s.stall().is_none());
    }

    #[test]
    fn a_sasl_error_names_the_kind_of_the_transport_failure_behind_it() {
        let s = ReplayStats::default();
        s.client_error("Authentication: SASL authentication error: invalid credentials");
        s.failed("metadata for topic events: Meta data fetch error: BrokerTransportFailure (Local: Broker transport failure)", 1);
        let f = s.failing.lock().unwrap().clone().unwrap();
        assert_eq!(f.kind, FailureKind::Authorization);
        assert!(f.reason.contains("BrokerTransportFailure"));
        assert!(f.client_error.unwrap().contains("invalid credentials"));
        // While deliveries succeed, a connection's error is not a failure.
        s.set_connected(true, "");
        s.client_error("SSL: SSL handshake failed");
        assert!(s.failing.lock().unwrap().is_none());
    }
}
