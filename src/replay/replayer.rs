//! The replayer: streams the WAL into Kafka and advances the committed offset
//! only over a contiguous prefix of confirmed deliveries.
//!
//! State machine (one "incarnation" per producer):
//!
//! ```text
//!   start: delivered = committed offset (sled)
//!   loop:
//!     build producer ──fail──> backoff, retry
//!     reader = WAL from delivered + 1
//!     running:
//!       read durable record ──> produce, push its delivery future (FIFO)
//!       front future resolves (in produce order):
//!         ok                  ──> delivered = seq
//!         gap (WAL loss)      ──> delivered = gap.last (counted by the WAL)
//!         permanent error     ──> isolate: drop the producer (purging
//!                                 everything queued behind it), new
//!                                 incarnation that produces the suspects
//!                                 one at a time (the broker refuses whole
//!                                 requests, so neighbours may be innocent);
//!                                 fails permanently alone ──> dead-letter
//!                                 topic ──fails permanently──> dead-letter
//!                                 file; then delivered = seq
//!         retriable           ──> drop producer (purges its queue), backoff,
//!                                 new incarnation from delivered + 1
//!         fatal producer      ──> same: a new producer
//!       any failure: produce nothing more; read the reports still pending
//!         only for refusals (they widen the isolation range)
//!       no report for kafka.message-timeout-ms with records in flight
//!                             ──> like retriable (librdkafka never times out)
//!       every commit-interval: flush delivered to sled, then WAL GC below it
//!     shutdown: keep delivering what is durable (ingest has stopped) until
//!               caught up or the drain deadline passes; flush the offset
//! ```
//!
//! Ordering: records are produced in sequence order and a record's key picks
//! its partition, so each tenant's records reach their partition in order
//! (idempotent producer, acks=all). After a retry, records already delivered
//! may be produced again: at-least-once, with the event id in a header.
//!
//! First occurrences rise per partition. Each producer writes, per partition,
//! a prefix of what it was given: the broker takes a producer's batches only
//! in sequence, librdkafka never times a record out (`message.timeout.ms` 0),
//! a refused batch stops the producer (`enable.gapless.guarantee`) instead of
//! letting later batches through, and replay produces nothing after a failed
//! or refused produce call. Every producer starts at the first unconfirmed
//! record, so a record it writes below another's first occurrence was
//! already written by an earlier producer (or process) and is a repeat.
//!
//! Isolation keeps that order: producing a refused record again while later
//! records sit in librdkafka's queue would put it behind them (librdkafka
//! renumbers the queue after a permanent error and sends on). So a permanent
//! error ends the incarnation first; the purge drops the later records, and
//! the suspects go out alone, each settled before the next is produced.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use tokio::sync::watch;

use super::dead_letter::DeadLetterFile;
use super::offsets::{Fate, OffsetStore};
use super::partition::{PartitionMap, Pin as PartitionPin, Scheme};
use super::producer::{HEADER_ERROR, HEADER_ORIGINAL_TOPIC, HEADER_SEQ};
use super::{classify, producer_config, Failure, FailureKind, KafkaHealth, ReplayStats};
use super::{KafkaConfig, ReplayConfig};
use crate::wal::{ReadItem, Record, Wal};

type Producer_ = FutureProducer<KafkaHealth>;

/// The result of one in-flight entry, in sequence order.
enum Settled {
    /// Every record up to and including this sequence number is done.
    Done(u64),
    Failed {
        seq: u64,
        error: KafkaError,
        record: Record,
    },
}

type Pending = Pin<Box<dyn Future<Output = Settled> + Send>>;

/// Records handed to librdkafka and not yet settled. This, not the length
/// of the ordered queue, is what `replay.max-in-flight` bounds: a settled
/// entry waiting for an earlier partition's report is a few bytes, while an
/// unsettled one holds its payload inside librdkafka. Bounding the queue
/// instead lets one slow partition stall all the others (head-of-line):
/// measured at 10,000 in flight, a drain ran at 121k records/s that way.
struct Window {
    unsettled: std::sync::atomic::AtomicUsize,
    /// Signalled when a delivery settles, so the loop re-checks for room.
    freed: tokio::sync::Notify,
    /// Set by the first failed delivery or refused produce call. Nothing is
    /// produced after it in this incarnation: a later record of the same
    /// partition could otherwise be written before the failed one is.
    failed: std::sync::atomic::AtomicBool,
    /// When a delivery last settled, or the window last became busy: the
    /// stall check's clock, since librdkafka itself never times out.
    progress: std::sync::Mutex<std::time::Instant>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            unsettled: Default::default(),
            freed: Default::default(),
            failed: Default::default(),
            progress: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Window {
    fn settled(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Relaxed);
        }
        self.touch();
        self.unsettled.fetch_sub(1, Ordering::Relaxed);
        self.freed.notify_one();
    }

    fn produced(&self) {
        if self.unsettled.fetch_add(1, Ordering::Relaxed) == 0 {
            self.touch();
        }
    }

    fn touch(&self) {
        if let Ok(mut t) = self.progress.lock() {
            *t = std::time::Instant::now();
        }
    }

    /// Records are in flight and none settled for `limit` (zero: never).
    fn stalled(&self, limit: Duration) -> bool {
        !limit.is_zero()
            && self.unsettled.load(Ordering::Relaxed) > 0
            && self.progress.lock().is_ok_and(|t| t.elapsed() >= limit)
    }

    /// Whether replay may hand librdkafka another record: no failure yet,
    /// fewer than `max` unsettled, and the ordered queue (`queued` entries)
    /// under its cap.
    fn has_room(&self, queued: usize, max: usize) -> bool {
        !self.failed.load(Ordering::Relaxed)
            && self.unsettled.load(Ordering::Relaxed) < max
            && queued < max * ORDER_WINDOW_FACTOR
    }
}

/// Settled entries waiting behind an unsettled one, at most, per unit of
/// `max-in-flight` (they are a `u64` each unless they failed).
const ORDER_WINDOW_FACTOR: usize = 8;

/// Records produced and not yet covered by the flushed offset, at most, per
/// unit of `max-in-flight`: a kill makes replay produce at most this many
/// again.
const UNFLUSHED_FACTOR: usize = 2;

/// Records produced per wake-up of the replay loop at most, so that
/// settling deliveries, commits and shutdown are still served in between.
const PRODUCE_BURST: usize = 256;

/// Delivery reports settled per wake-up of the replay loop at most, for the
/// same reason.
const SETTLE_BURST: usize = 1024;

enum End {
    Shutdown,
    Retry(String),
    /// No delivery report for the stall limit with records in flight (and
    /// no failure seen): retried like `Retry`, and the cluster is asked why.
    Stalled(String),
    /// The producer stopped itself (the gapless guarantee) after a refused
    /// record was dead-lettered: a new one at once, no backoff.
    Renew,
    /// A permanent error at `from`: produce `from..=through` one at a time.
    Isolate {
        from: u64,
        through: u64,
    },
}

/// Whether record `next` may be handed to librdkafka with `queued` entries
/// pending, while `isolate_through` (0: none) is the last suspect of a
/// refused request. A suspect goes out only with nothing else in flight, and
/// so does the first record after the suspects: produced while the last
/// suspect is pending, it can share the suspect's request (same partition,
/// within the linger), and if the broker refuses that request the suspect
/// is condemned as if it had been refused alone. On Apache Kafka with a
/// topic's `max.message.bytes` below the producer's batches, that sent one
/// innocent record per isolation round to the dead-letter topic (11 of
/// 6,000 records in a minute) before this waited for it.
fn may_produce(next: u64, isolate_through: u64, queued: usize) -> bool {
    queued == 0 || next > isolate_through.saturating_add(1)
}

/// Records produced one at a time after a permanent error, at most: the
/// refused request held some of the records produced before the error
/// settled. Suspects past this cap go out in batches again; if they are
/// refused too, another isolation round starts at the first of them.
const ISOLATE_MAX: u64 = 1024;

pub struct Replayer {
    pub wal: Arc<Wal>,
    pub offsets: Arc<OffsetStore>,
    pub kafka: KafkaConfig,
    pub brokers: String,
    pub cfg: ReplayConfig,
    pub stats: Arc<ReplayStats>,
    pub dead_letter: DeadLetterFile,
    /// How long shutdown waits for in-flight deliveries.
    pub drain: Duration,
    /// Each stream's topics; a record goes to those of its stream.
    pub streams: super::StreamTopics,
    /// `[sink] kind = "files"`: the archive files instead of Kafka.
    pub files: Option<super::files::FilesSink>,
    /// Each topic's pinned partitioning, as last resolved (`Default`).
    pub routes: Routes,
}

/// Each topic's partitioning as this process last resolved it: the pins
/// from the offset store and the partition count the broker reported.
#[derive(Default)]
pub struct Routes(std::sync::Mutex<std::collections::HashMap<String, Route>>);

struct Route {
    map: PartitionMap,
    live: i32,
    resolved: std::time::Instant,
    /// A fold was logged for this resolution (one line per topic and
    /// refresh, not one per record; each record is counted).
    fold_logged: bool,
    /// Since when the broker has reported fewer partitions than pinned.
    fewer_since: Option<std::time::Instant>,
}

/// How long a topic must keep reporting fewer partitions than pinned before
/// the smaller count is believed. Kafka never removes partitions; a smaller
/// answer is a lagging broker's, or the topic was deleted and recreated.
/// Until then replay waits (retrying) rather than move any record.
const FEWER_PARTITIONS_CONFIRM: Duration = Duration::from_secs(300);

/// How long a topic's partition count is trusted before it is asked again:
/// a topic that grows is noticed within this, and switched at a boundary
/// above everything produced so far.
const ROUTE_REFRESH: Duration = Duration::from_secs(30);

/// How long a metadata request for a topic's partition count may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

impl Replayer {
    /// Runs until `shutdown` turns true, then drains and flushes the offset.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut delivered = match self.offsets.committed() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the committed offset; replay not started");
                return;
            }
        };
        self.stats.committed.store(delivered, Ordering::Relaxed);
        self.stats
            .delivered_through
            .store(delivered, Ordering::Relaxed);
        // The sink decides how records become delivered; the offset flush,
        // WAL GC and shutdown below are the same for both.
        if let Some(sink) = &self.files {
            let delivered = self.run_files(sink, delivered, shutdown).await;
            self.commit(delivered).await;
            tracing::info!(committed = delivered, "replay stopped");
            return;
        }
        let initial = Duration::from_millis(self.cfg.backoff_initial_ms);
        let max = Duration::from_millis(self.cfg.backoff_max_ms);
        let mut backoff = initial;
        let mut first = true;
        // Highest sequence number to produce alone; 0 when not isolating.
        let mut isolate_through = 0;
        while !*shutdown.borrow() {
            if !first {
                self.stats
                    .producer_recreations
                    .fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let producer: Producer_ = match producer_config(&self.kafka, &self.brokers)
                .create_with_context(KafkaHealth(self.stats.clone()))
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot create the Kafka producer");
                    if sleep_or_shutdown(backoff, &mut shutdown).await {
                        break;
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
            let before = delivered;
            let end = self
                .incarnation(&producer, &mut delivered, isolate_through, &mut shutdown)
                .await;
            if delivered > before {
                backoff = initial;
            }
            // Whatever ended the incarnation, a fatal error means this
            // producer can never recover by itself.
            if let Some((code, fatal)) = producer.client().fatal_error() {
                self.stats.fatal_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(?code, reason = %fatal, "fatal producer error: recreating the producer");
            }
            if matches!(end, End::Stalled(_)) {
                self.diagnose_stall();
            }
            match end {
                End::Shutdown => break,
                End::Renew => {
                    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
                }
                End::Isolate { from, through } => {
                    tracing::warn!(
                        from_seq = from,
                        through_seq = through,
                        "Kafka refused a produce request for good: producing its records again one at a time"
                    );
                    isolate_through = through;
                    // Purge everything queued behind the refused request
                    // before any suspect is produced again; see the module
                    // doc. No backoff: Kafka is up, it refused this request.
                    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
                }
                End::Retry(why) | End::Stalled(why) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.stats.failed(&why, delivered + 1);
                    tracing::warn!(
                        from_seq = delivered + 1,
                        reason = %why,
                        backoff_ms = backoff.as_millis() as u64,
                        "delivery failed: producing again from the last confirmed record"
                    );
                    // Dropping the producer purges what it still queues, so
                    // the next incarnation starts clean. The drop flushes for
                    // up to 500 ms: keep it off the async workers.
                    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
                    if sleep_or_shutdown(backoff, &mut shutdown).await {
                        break;
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        self.commit(delivered).await;
        tracing::info!(committed = delivered, "replay stopped");
    }

    /// One producer's life: reads the WAL from `delivered + 1`, produces in
    /// order inside the window, settles delivery reports in sequence, commits
    /// the offset on the cadence, and ends on shutdown, a stall, a refusal or
    /// a failure.
    ///
    /// It stays one function (about 160 lines) because it is one `select!`
    /// loop whose arms share and mutate the same state: `pending` (the
    /// ordered delivery futures), `broken` (set by the loop head and the
    /// settle arm, read by the loop head, the settle arm and the tick arm),
    /// `deadline`, `reader` and `*delivered`. The arms' order (`biased`) is
    /// the priority of shutdown over settling over reading, and each arm's
    /// guard reads the state the others leave. Moving an arm out means
    /// passing that state as a bundle of `&mut` borrows into a struct used
    /// only here, which hides the coupling rather than removing it; each arm
    /// is commented where it decides an ordering.
    async fn incarnation(
        &self,
        producer: &Producer_,
        delivered: &mut u64,
        isolate_through: u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let mut reader = self.wal.reader(*delivered + 1);
        let durable = self.wal.durable();
        let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
        // Ticks at the cadence floor; `Cadence` decides whether to flush.
        let mut cadence = Cadence::new(Duration::from_millis(self.cfg.commit_interval_ms));
        let mut tick = tokio::time::interval(cadence.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set once shutdown is requested: keep delivering what is durable
        // (ingest has stopped, so the frontier no longer moves) until caught
        // up or until the deadline; the rest stays in the WAL.
        let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let stats = &self.stats;
        let window = Arc::new(Window::default());
        let max = self.cfg.max_in_flight;
        // Set by the first failure: from then on nothing is produced and
        // nothing more counts as delivered; what is still pending is only
        // read for refusals, to learn which records to isolate.
        let mut broken: Option<Broken> = None;
        let stall = Duration::from_millis(self.kafka.message_timeout_ms);
        loop {
            if broken.is_none() {
                if let Some((code, why)) = producer.client().fatal_error() {
                    window.failed.store(true, Ordering::Relaxed);
                    let mut b = Broken::new(format!("fatal producer error {code:?}: {why}"));
                    b.gapless_stop = code == RDKafkaErrorCode::GaplessGuarantee;
                    broken = Some(b);
                }
            }
            if let Some(b) = &broken {
                if pending.is_empty() {
                    return b.end(reader.next_seq() - 1);
                }
            }
            let caught_up = reader.next_seq() >= durable.borrow().next_seq;
            if deadline.is_some() && caught_up && pending.is_empty() {
                return End::Shutdown;
            }
            let alone = |next: u64, queued: usize| may_produce(next, isolate_through, queued);
            // Produced but not flushed, at most: what a kill can make replay
            // produce again.
            let unflushed = |next: u64| {
                next.saturating_sub(1 + stats.committed.load(Ordering::Relaxed))
                    < (max * UNFLUSHED_FACTOR) as u64
            };
            let room = window.has_room(pending.len(), max)
                && alone(reader.next_seq(), pending.len())
                && unflushed(reader.next_seq());
            tokio::select! {
                biased;
                _ = shutdown.changed(), if deadline.is_none() => {
                    deadline = Some(Box::pin(tokio::time::sleep(self.drain)));
                }
                _ = async { deadline.as_mut().expect("guarded").await }, if deadline.is_some() => {
                    tracing::warn!(in_flight = pending.len(), next_seq = reader.next_seq(), "drain deadline passed; the rest stays in the WAL");
                    return End::Shutdown;
                }
                Some(first) = pending.next(), if !pending.is_empty() => {
                    // Reports that are already in settle in this one wake-up,
                    // in order, not one per trip through this select! (whose
                    // arms' futures are built and dropped on every trip). A
                    // failure ends the run so the loop head sees it first.
                    let mut next = Some(first);
                    let mut settled_now = 0;
                    while let Some(settled) = next.take() {
                        settled_now += 1;
                        // After a failed delivery, later reports only tell which
                        // records were refused. After a fatal error alone, the
                        // reports still settle in order as usual.
                        if let Some(b) = broken.as_mut().filter(|b| b.failed()) {
                            b.note(settled);
                            break;
                        }
                        let failed_seq = match &settled {
                            Settled::Failed { seq, .. } => Some(*seq),
                            Settled::Done(_) => None,
                        };
                        match self.settle(settled, isolate_through).await {
                            Ok(seq) => {
                                *delivered = seq;
                                stats.delivered_through.store(seq, Ordering::Relaxed);
                            }
                            Err(End::Isolate { from, .. }) => {
                                // The rest of the window may hold more of the
                                // refused request: read it before deciding.
                                let mut b = Broken::new(format!("seq {from} refused"));
                                b.refused(from);
                                broken = Some(b);
                                break;
                            }
                            Err(End::Retry(why)) => {
                                let mut b = Broken::new(why);
                                if let Some(seq) = failed_seq {
                                    b.first_failed(seq);
                                }
                                broken = Some(b);
                                break;
                            }
                            Err(end) => return end,
                        }
                        if settled_now < SETTLE_BURST && broken.is_none() {
                            next = pending.next().now_or_never().flatten();
                        }
                    }
                    stats.in_flight.store(window.unsettled.load(Ordering::Relaxed) as u64, Ordering::Relaxed);
                }
                item = reader.next(), if room && !(deadline.is_some() && caught_up) => {
                    let mut item = Some(item);
                    let mut burst = 0;
                    // One clock read per burst: its records are handed to
                    // librdkafka within microseconds of each other.
                    let burst_started = std::time::Instant::now();
                    while let Some(next) = item.take() {
                        match next {
                            Ok(ReadItem::Record { seq, record, .. }) => {
                                if seq <= isolate_through {
                                    stats.isolated_retries.fetch_add(1, Ordering::Relaxed);
                                }
                                let partition = match self.partition_of(producer, &record.stream, false, record.key.as_deref(), seq).await {
                                    Ok(p) => p,
                                    // Nothing of this record was produced;
                                    // the next incarnation starts at the first
                                    // unconfirmed one.
                                    Err(why) => return End::Retry(why),
                                };
                                pending.push_back(self.produce(producer, &window, seq, partition, record, burst_started).await);
                                stats.produced.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(ReadItem::Gap(g)) => {
                                // Already counted and logged by the WAL; replay
                                // moves past it so damage never wedges delivery.
                                stats.gap_records.fetch_add(g.len(), Ordering::Relaxed);
                                // For receipts; durable with the commit that
                                // passes the gap, which comes after this.
                                if let Err(e) = self.offsets.record_fate(g.first, g.last, Fate::Lost) {
                                    return End::Retry(format!("recording lost range: {e}"));
                                }
                                pending.push_back(Box::pin(std::future::ready(Settled::Done(g.last))));
                            }
                            Err(e) => return End::Retry(format!("WAL read: {e}")),
                        }
                        // Records already durable are produced in a burst,
                        // not one per trip through this select!, while the
                        // window has room. try_next never returns a record
                        // past the durable frontier, as next does not.
                        burst += 1;
                        if burst < PRODUCE_BURST
                            && window.has_room(pending.len(), max)
                            && alone(reader.next_seq(), pending.len())
                            && unflushed(reader.next_seq())
                        {
                            item = reader.try_next().transpose();
                        }
                    }
                    let n = window.unsettled.load(Ordering::Relaxed) as u64;
                    stats.in_flight.store(n, Ordering::Relaxed);
                    stats.peak_in_flight.fetch_max(n, Ordering::Relaxed);
                }
                // A delivery behind the queue's head settled: re-check room.
                _ = window.freed.notified(), if !room => {}
                _ = tick.tick() => {
                    // After a fatal error librdkafka sends nothing more, and
                    // a batch the broker answered OUT_OF_ORDER_SEQUENCE
                    // (it was in flight behind a refused one) goes back to
                    // its partition's queue, where no report ever comes
                    // for it. Purge the queues so that it reports and the
                    // incarnation ends now, not at the stall limit (on
                    // Apache Kafka 4.4 a record over the topic's
                    // max.message.bytes held replay for the whole
                    // kafka.message-timeout-ms this way).
                    if broken.is_some() && producer.client().fatal_error().is_some() {
                        producer.purge(PurgeConfig::default().queue().non_blocking());
                    }
                    let full = !unflushed(reader.next_seq());
                    if cadence.due(full) {
                        let t0 = std::time::Instant::now();
                        self.commit(*delivered).await;
                        cadence.committed(t0.elapsed());
                    }
                    if window.stalled(stall) {
                        return match &broken {
                            // After a failure, the reports still pending
                            // never came: counted as a stall too, since
                            // replay sat out the whole limit.
                            Some(b) => {
                                let pending = window.unsettled.load(Ordering::Relaxed);
                                tracing::warn!(pending, stall_ms = stall.as_millis() as u64, reason = %b.why, "no report for the records still pending after a failure: ending the incarnation");
                                stats.failures[FailureKind::Stall as usize].fetch_add(1, Ordering::Relaxed);
                                b.end(reader.next_seq() - 1)
                            }
                            None => End::Stalled(format!(
                                "no delivery report for {} ms with {} records in flight",
                                stall.as_millis(),
                                window.unsettled.load(Ordering::Relaxed)
                            )),
                        };
                    }
                }
            }
        }
    }

    /// Produces one record; the returned future settles with its delivery.
    async fn produce(
        &self,
        producer: &Producer_,
        window: &Arc<Window>,
        seq: u64,
        partition: i32,
        record: Record,
        started: std::time::Instant,
    ) -> Pending {
        let Some(topics) = self.streams.of(&record.stream) else {
            // `serve` refuses to start while the WAL holds a stream it does
            // not configure, so this is a bug; the record stays in the WAL
            // (retried, never skipped) rather than going to a wrong topic.
            tracing::error!(seq, stream = %record.stream, "record of an unconfigured stream: not produced; replay retries");
            window.failed.store(true, Ordering::Relaxed);
            return Box::pin(std::future::ready(Settled::Failed {
                seq,
                error: KafkaError::Canceled,
                record,
            }));
        };
        let headers = kafka_headers(&record, seq, &[]);
        let stream = record.stream.clone();
        let mut fr = future_record(&topics.topic, &record, headers, partition);
        let observer = self.stats.observer();
        loop {
            match producer.send_result(fr) {
                Ok(delivery) => {
                    crate::debug::pause(crate::debug::Site::Replay);
                    window.produced();
                    let window = window.clone();
                    return Box::pin(async move {
                        let report = delivery.await;
                        window.settled(matches!(report, Ok(Ok(_))));
                        if let Some(o) = &observer {
                            o.delivered(started.elapsed());
                        }
                        match report {
                            Ok(Ok(_)) => Settled::Done(seq),
                            Ok(Err((error, msg))) => Settled::Failed {
                                seq,
                                error,
                                record: from_message(&msg, stream),
                            },
                            Err(_canceled) => Settled::Failed {
                                seq,
                                error: KafkaError::Canceled,
                                record: Record {
                                    stream,
                                    key: None,
                                    value: Vec::new(),
                                    headers: Vec::new(),
                                    timestamp_ms: 0,
                                },
                            },
                        }
                    });
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => {
                    // Never enqueued: later records must not be either.
                    window.failed.store(true, Ordering::Relaxed);
                    return Box::pin(std::future::ready(Settled::Failed { seq, error, record }));
                }
            }
        }
    }

    /// Turns a settled entry into the new delivered-through sequence number,
    /// or the way this incarnation ends.
    async fn settle(&self, settled: Settled, isolate_through: u64) -> Result<u64, End> {
        let stats = &self.stats;
        match settled {
            Settled::Done(seq) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                stats.set_connected(true, "");
                Ok(seq)
            }
            Settled::Failed { seq, error, record } => match classify(&error) {
                Failure::Retriable => Err(End::Retry(format!("seq {seq}: {error}"))),
                // Produced alone and still refused: the record itself is bad.
                Failure::Permanent if seq <= isolate_through => {
                    self.dead_letter(seq, &error, record)
                        .await
                        .map_err(End::Retry)?;
                    Ok(seq)
                }
                // A broker refuses a whole produce request, so this does not
                // prove the record is the bad one: isolate before condemning.
                Failure::Permanent => Err(End::Isolate {
                    from: seq,
                    through: seq,
                }),
            },
        }
    }

    /// A record Kafka will never take: to the dead-letter topic with error
    /// headers, or, if that refuses it permanently too, to the dead-letter
    /// file. A retriable failure of the dead-letter produce retries the whole
    /// record later (it is produced again from the committed offset).
    async fn dead_letter(
        &self,
        seq: u64,
        error: &KafkaError,
        record: Record,
    ) -> Result<(), String> {
        let Some(topics) = self.streams.of(&record.stream).cloned() else {
            return Err(format!(
                "seq {seq}: stream {:?} is not configured",
                record.stream
            ));
        };
        let mut why = error.to_string();
        // Bounded so a record that fits its topic fits the dead-letter topic.
        if why.len() > super::ERROR_HEADER_MAX {
            let mut cut = super::ERROR_HEADER_MAX;
            while !why.is_char_boundary(cut) {
                cut -= 1;
            }
            why.truncate(cut);
        }
        let headers = kafka_headers(
            &record,
            seq,
            &[
                (HEADER_ERROR, why.as_bytes()),
                (HEADER_ORIGINAL_TOPIC, topics.topic.as_bytes()),
            ],
        );
        // A producer of its own: the replay producer stopped itself when
        // the broker refused this record (the gapless guarantee). Bounded by
        // the stall limit, since ordering does not matter for one record.
        let mut config = producer_config(&self.kafka, &self.brokers);
        if self.kafka.message_timeout_ms > 0 {
            config.set(
                "message.timeout.ms",
                self.kafka.message_timeout_ms.to_string(),
            );
        }
        let producer: Producer_ = config
            .create_with_context(KafkaHealth(self.stats.clone()))
            .map_err(|e| format!("dead-letter producer: {e}"))?;
        // Pinned like the topic's: a record dead-lettered again after a kill
        // lands on the same dead-letter partition, where the rule drops it.
        let partition = self
            .partition_of(&producer, &record.stream, true, record.key.as_deref(), seq)
            .await?;
        let fr = future_record(&topics.dead_letter_topic, &record, headers, partition);
        let dlq_error = match producer.send_result(fr) {
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e),
                Err(_) => Some(KafkaError::Canceled),
            },
            Err((e, _)) => Some(e),
        };
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
        match dlq_error {
            None => {
                self.offsets
                    .record_fate(seq, seq, Fate::DeadLetteredTopic)
                    .map_err(|e| format!("recording dead letter {seq}: {e}"))?;
                self.stats
                    .dead_lettered_topic
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(seq, error = %why, topic = %topics.dead_letter_topic, "record refused by Kafka: sent to the dead-letter topic");
                Ok(())
            }
            Some(e) if classify(&e) == Failure::Permanent => {
                let file = &self.dead_letter;
                let appended = file
                    .append(seq, &topics.topic, &why, &record)
                    .map_err(|io| format!("dead-letter file {}: {io}", file.path().display()))?;
                if appended.truncated_partial > 0 {
                    self.stats
                        .dead_letter_partial_lines
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.offsets
                    .record_fate(seq, seq, Fate::DeadLetteredFile)
                    .map_err(|e| format!("recording dead letter {seq}: {e}"))?;
                self.stats
                    .dead_lettered_file
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(seq, error = %why, dead_letter_error = %e, file = %file.path().display(), "record refused by Kafka and by the dead-letter topic: written to the dead-letter file");
                Ok(())
            }
            Some(e) => Err(format!("dead-letter produce for seq {seq}: {e}")),
        }
    }

    /// The partition of record `seq` of `stream` in its topic (or its
    /// dead-letter topic): a function of the key, `seq` and the count pinned
    /// for that seq, never of librdkafka's partitioner (see `partition.rs`).
    async fn partition_of(
        &self,
        producer: &Producer_,
        stream: &str,
        dead_letter: bool,
        key: Option<&[u8]>,
        seq: u64,
    ) -> Result<i32, String> {
        let Some(topics) = self.streams.of(stream) else {
            return Err(format!("seq {seq}: stream {stream:?} is not configured"));
        };
        let topic = if dead_letter {
            &topics.dead_letter_topic
        } else {
            &topics.topic
        };
        let fresh = |r: &Route| r.resolved.elapsed() < ROUTE_REFRESH;
        let (cached, stale) = {
            let routes = self.routes.0.lock().map_err(|_| "routes lock poisoned")?;
            match routes.get(topic.as_str()) {
                Some(r) if fresh(r) => (r.map.partition(key, seq, r.live), false),
                Some(_) => (None, true),
                None => (None, false),
            }
        };
        let (p, folded) = match cached {
            Some(hit) => hit,
            None => {
                let fewer_since = self
                    .routes
                    .0
                    .lock()
                    .ok()
                    .and_then(|r| r.get(topic.as_str()).and_then(|r| r.fewer_since));
                match self.resolve(producer, topic, fewer_since).await {
                    Ok(route) => {
                        let hit = route.map.partition(key, seq, route.live).ok_or_else(|| {
                            format!("topic {topic}: no partition pin covers seq {seq}")
                        })?;
                        let mut routes =
                            self.routes.0.lock().map_err(|_| "routes lock poisoned")?;
                        routes.insert(topic.clone(), route);
                        hit
                    }
                    // A refresh that fails keeps the route this process
                    // already trusts (the pins are durable and the count
                    // did not change as far as anyone knows): a slow or
                    // failed metadata request must not end the incarnation
                    // and send the window again. Asked again in 5 s.
                    Err(why) if stale => {
                        let mut routes =
                            self.routes.0.lock().map_err(|_| "routes lock poisoned")?;
                        let r = routes.get_mut(topic.as_str()).ok_or("route vanished")?;
                        if why.contains("fewer partitions") {
                            r.fewer_since.get_or_insert_with(std::time::Instant::now);
                        }
                        tracing::warn!(topic = %topic, error = %why, "refreshing the topic's partition count failed; keeping the pinned route");
                        r.resolved =
                            std::time::Instant::now() - ROUTE_REFRESH + Duration::from_secs(5);
                        r.map.partition(key, seq, r.live).ok_or_else(|| {
                            format!("topic {topic}: no partition pin covers seq {seq}")
                        })?
                    }
                    Err(why) => {
                        if why.contains("fewer partitions") {
                            // Remember when this started, across retries.
                            let mut routes =
                                self.routes.0.lock().map_err(|_| "routes lock poisoned")?;
                            let since = fewer_since.unwrap_or_else(std::time::Instant::now);
                            routes.entry(topic.clone()).or_insert(Route {
                                map: PartitionMap::default(),
                                live: 0,
                                resolved: std::time::Instant::now() - ROUTE_REFRESH,
                                fold_logged: false,
                                fewer_since: Some(since),
                            });
                        }
                        return Err(why);
                    }
                }
            }
        };
        if folded {
            self.stats.partition_folds.fetch_add(1, Ordering::Relaxed);
            let first = self
                .routes
                .0
                .lock()
                .ok()
                .and_then(|mut r| {
                    r.get_mut(topic.as_str())
                        .map(|r| !std::mem::replace(&mut r.fold_logged, true))
                })
                .unwrap_or(true);
            if first {
                tracing::warn!(first_seq = seq, topic = %topic, partition = p, "records whose pinned partition no longer exists (the topic was recreated with fewer partitions) go to another partition; a consumer rule cannot match them with earlier copies (each counted in sluice_replay_partition_folds_total; logged once per refresh)");
            }
        }
        Ok(p)
    }

    /// Asks the cluster why nothing was confirmed (`stall::diagnose`), in a
    /// task of its own so that the next producer does not wait for it. The
    /// verdict is kept only if nothing was delivered meanwhile (a delivery
    /// clears the stall; a late verdict must not bring it back).
    fn diagnose_stall(&self) {
        let stats = self.stats.clone();
        let config = producer_config(&self.kafka, &self.brokers);
        let topics = self.streams.topics();
        let before = stats.delivered.load(Ordering::Relaxed);
        tokio::spawn(async move {
            let s = super::stall::diagnose(config, topics, super::stall::DIAGNOSE_WITHIN).await;
            if stats.delivered.load(Ordering::Relaxed) == before {
                tracing::warn!(
                    cause = s.cause.label(),
                    detail = %s.detail,
                    "replay stalled: no delivery report within kafka.message-timeout-ms; the cluster shows why"
                );
                stats.set_stall(s);
            }
        });
    }

    /// Asks the broker for `topic`'s partition count and reconciles it with
    /// the pins in the offset store: the first use pins the count; a changed
    /// count is pinned from a boundary above every record any process can
    /// have produced (the WAL's durable end: replay never produces past it),
    /// durable before this returns, so no record is ever produced under two
    /// counts.
    async fn resolve(
        &self,
        producer: &Producer_,
        topic: &str,
        fewer_since: Option<std::time::Instant>,
    ) -> Result<Route, String> {
        let client = producer.clone();
        let name = topic.to_string();
        let live = tokio::task::spawn_blocking(move || {
            let md = client
                .client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                .map_err(|e| format!("metadata for topic {name}: {e}"))?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == name)
                .ok_or_else(|| format!("metadata for topic {name}: topic not in the answer"))?;
            if let Some(e) = t.error() {
                return Err(format!(
                    "metadata for topic {name}: {:?}",
                    RDKafkaErrorCode::from(e)
                ));
            }
            match i32::try_from(t.partitions().len()) {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("metadata for topic {name}: no partitions")),
            }
        })
        .await
        .map_err(|e| format!("metadata task: {e}"))??;
        let live = crate::debug::cap_partitions(live);
        let offsets = self.offsets.clone();
        let durable_next = self.wal.durable().borrow().next_seq;
        let name = topic.to_string();
        let stats = self.stats.clone();
        let map = tokio::task::spawn_blocking(move || -> Result<PartitionMap, String> {
            let (mut map, damaged) = offsets
                .partition_pins(&name)
                .map_err(|e| format!("reading partition pins of {name}: {e}"))?;
            for d in &damaged {
                tracing::error!(topic = %name, entry = %d, "a partition pin does not decode: ignored (records it covered follow the pin before it)");
            }
            let new: Vec<PartitionPin> = match map.latest() {
                None => {
                    // Records below `since` may have been produced by a build
                    // that let librdkafka's consistent_random partitioner
                    // choose (CRC-32 of the key); they keep that scheme.
                    let since = offsets
                        .set_pinning_since(durable_next)
                        .map_err(|e| format!("recording the pinning start: {e}"))?;
                    let mut pins = Vec::new();
                    if since > 1 {
                        pins.push(PartitionPin {
                            from_seq: 0,
                            partitions: live,
                            scheme: Scheme::Crc32,
                        });
                    }
                    pins.push(PartitionPin {
                        from_seq: if since > 1 { since } else { 0 },
                        partitions: live,
                        scheme: Scheme::Murmur2,
                    });
                    tracing::info!(topic = %name, partitions = live, from_seq = since, "partition count pinned for the topic");
                    pins
                }
                Some(last) if last.partitions == live => Vec::new(),
                // Fewer than pinned: not believed until it has lasted (see
                // FEWER_PARTITIONS_CONFIRM); the caller retries.
                Some(last)
                    if live < last.partitions
                        && fewer_since.is_none_or(|t| t.elapsed() < FEWER_PARTITIONS_CONFIRM) =>
                {
                    return Err(format!(
                        "topic {name} reports fewer partitions ({live}) than pinned ({}): not believed until it lasts {} s (a lagging broker, or the topic was recreated); retrying",
                        last.partitions,
                        FEWER_PARTITIONS_CONFIRM.as_secs()
                    ));
                }
                Some(last) => {
                    // Everything at or above the boundary is unproduced: the
                    // WAL's durable end bounds what any process produced,
                    // since replay reads only durable records.
                    let boundary = durable_next.max(last.from_seq + 1);
                    stats.partition_changes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = %name, from_partitions = last.partitions, to_partitions = live, from_seq = boundary, "the topic's partition count changed: records from this seq on are partitioned over the new count, those below keep the old one");
                    vec![PartitionPin {
                        from_seq: boundary,
                        partitions: live,
                        scheme: Scheme::Murmur2,
                    }]
                }
            };
            if !new.is_empty() {
                // Dying before this returns leaves the old pins: records
                // above the boundary were not produced yet either way.
                offsets
                    .add_partition_pins(&name, &new)
                    .map_err(|e| format!("pinning partitions of {name}: {e}"))?;
                for pin in new {
                    map.push(pin);
                }
            }
            Ok(map)
        })
        .await
        .map_err(|e| format!("pin task: {e}"))??;
        Ok(Route {
            map,
            live,
            resolved: std::time::Instant::now(),
            fold_logged: false,
            fewer_since: None,
        })
    }

    /// Flushes the offset, then (only then) lets GC delete segments below it.
    pub(super) async fn commit(&self, delivered: u64) {
        if delivered <= self.stats.committed.load(Ordering::Relaxed) {
            return;
        }
        let (offsets, wal) = (self.offsets.clone(), self.wal.clone());
        let result = tokio::task::spawn_blocking(move || {
            // Dying here leaves delivered records above the flushed offset:
            // the next start produces them again (repeats, never firsts).
            crate::debug::pause(crate::debug::Site::Flush);
            // GC runs inside the commit's serialization: no other commit
            // (the periodic idempotency checkpoint) writes to the store
            // between this fsync and these unlinks.
            let (_, removed) = offsets
                .commit_then(delivered, || {
                    // Dying here leaves consumed segments that the next open
                    // removes.
                    crate::debug::pause(crate::debug::Site::Gc);
                    wal.remove_through(delivered)
                })
                .map_err(|e| e.to_string())?;
            removed.map_err(|e| e.to_string())
        })
        .await;
        match result {
            Ok(Ok(_)) => self.stats.committed.store(delivered, Ordering::Relaxed),
            Ok(Err(e)) => tracing::error!(error = %e, "committing the offset failed; will retry"),
            Err(e) => tracing::error!(error = %e, "commit task failed"),
        }
    }
}

/// The headers replay sends: `headers::Ours` decides (no `:sluice.`
/// header leaves), with `seq`, this data directory's `instance`, then
/// `extra`. `seq` is unique per data directory; `instance` names the
/// directory, so (instance, partition, seq) is what a consumer deduplicates on.
pub fn kafka_headers(record: &Record, seq: u64, extra: &[(&str, &[u8])]) -> OwnedHeaders {
    let ours = crate::replay::headers::Ours::new(seq, crate::instance::current()).extra(extra);
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 2 + extra.len());
    for (key, value) in ours.pairs(&record.headers) {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// What replay hands librdkafka for `record`: its value, key and timestamp,
/// `headers`, on the partition sluice chose (never librdkafka's partitioner).
fn future_record<'a>(
    topic: &'a str,
    record: &'a Record,
    headers: OwnedHeaders,
    partition: i32,
) -> FutureRecord<'a, Vec<u8>, Vec<u8>> {
    let fr = FutureRecord::to(topic)
        .payload(&record.value)
        .headers(headers)
        .partition(partition)
        .timestamp(record.timestamp_ms);
    match &record.key {
        Some(k) => fr.key(k),
        None => fr,
    }
}

/// Rebuilds the record from what librdkafka hands back with a failure.
fn from_message(msg: &OwnedMessage, stream: String) -> Record {
    let headers = msg
        .headers()
        .map(|h| {
            h.iter()
                .filter(|h| {
                    h.key != HEADER_SEQ && h.key != crate::replay::producer::HEADER_INSTANCE
                })
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Record {
        stream,
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().unwrap_or_default().to_vec(),
        headers,
        timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
    }
}

/// Sleeps, or returns true early if shutdown was requested.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// What an incarnation learns after its first failure, while the reports
/// still pending come in: which records the broker refused for good.
struct Broken {
    why: String,
    /// Lowest sequence number whose delivery failed.
    first: Option<u64>,
    /// Lowest and highest sequence numbers refused for good: under the
    /// gapless guarantee every record of the refused batch reports it.
    refused: Option<(u64, u64)>,
    /// The producer stopped itself after a refusal (the gapless guarantee).
    gapless_stop: bool,
}

impl Broken {
    fn new(why: String) -> Broken {
        Broken {
            why,
            first: None,
            refused: None,
            gapless_stop: false,
        }
    }

    fn failed(&self) -> bool {
        self.first.is_some() || self.refused.is_some()
    }

    fn first_failed(&mut self, seq: u64) {
        self.first = Some(self.first.map_or(seq, |f| f.min(seq)));
    }

    fn refused(&mut self, seq: u64) {
        self.first_failed(seq);
        self.refused = Some(match self.refused {
            None => (seq, seq),
            Some((lo, hi)) => (lo.min(seq), hi.max(seq)),
        });
    }

    fn note(&mut self, settled: Settled) {
        if let Settled::Failed { seq, error, .. } = settled {
            match classify(&error) {
                Failure::Permanent => self.refused(seq),
                Failure::Retriable => self.first_failed(seq),
            }
        }
    }

    /// How the incarnation ends once nothing is pending (or it stalled).
    /// Isolation covers the refused records and everything produced between
    /// them; the next incarnation starts at the first unconfirmed record.
    fn end(&self, produced: u64) -> End {
        match self.refused {
            Some((from, through)) => End::Isolate {
                from,
                through: through.min(produced).min(from + ISOLATE_MAX - 1).max(from),
            },
            None if !self.failed() && self.gapless_stop => End::Renew,
            None => End::Retry(self.why.clone()),
        }
    }
}

/// When to flush the offset: as often as every `FLOOR` while a flush is
/// cheap (it costs at most a tenth of the time between flushes), never less
/// often than `replay.commit-interval-ms`, and at once when the unflushed
/// window is full. Every flush shortens what a kill makes replay repeat.
struct Cadence {
    max: Duration,
    every: Duration,
    last: std::time::Instant,
}

impl Cadence {
    const FLOOR: Duration = Duration::from_millis(10);
    const COST_SHARE: u32 = 10;

    fn new(max: Duration) -> Cadence {
        Cadence {
            max,
            every: Self::FLOOR.min(max),
            last: std::time::Instant::now(),
        }
    }

    fn tick(&self) -> Duration {
        Self::FLOOR.min(self.max).max(Duration::from_millis(1))
    }

    fn due(&self, full: bool) -> bool {
        full || self.last.elapsed() >= self.every
    }

    fn committed(&mut self, cost: Duration) {
        self.last = std::time::Instant::now();
        self.every = (cost * Self::COST_SHARE).clamp(Self::FLOOR.min(self.max), self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::may_produce;

    #[test]
    fn suspects_and_the_record_after_them_go_out_with_nothing_in_flight() {
        // Not isolating: records go out in batches.
        assert!(may_produce(5, 0, 100));
        // Suspects 10..=20: each waits until nothing is in flight.
        assert!(!may_produce(10, 20, 1));
        assert!(!may_produce(20, 20, 1));
        assert!(may_produce(20, 20, 0));
        // The first record after the last suspect waits for its report too:
        // sharing its request, a refusal of the request would condemn it.
        assert!(!may_produce(21, 20, 1));
        assert!(may_produce(21, 20, 0));
        // After that, batches again.
        assert!(may_produce(22, 20, 50));
    }
}
