//! `sluice archive`: a Kafka consumer feeding the archive writer, exactly
//! once into the files.
//!
//! Per commit (every `commit-interval-ms` or `commit-records`): the writer
//! commits (files fdatasynced, checkpoint durable, holding each partition's
//! next offset and the highest `seq` per (instance, partition)); only then
//! are the offsets committed to Kafka, with the partition's high marks in
//! the commit metadata so they travel with the partition on a rebalance.
//!
//! On assignment a partition starts at the larger of the checkpoint's next
//! offset and the group's committed offset: ours is larger when we died
//! between our checkpoint and the Kafka commit (the lines are in our files),
//! the group's when another archiver owned the partition since. High marks
//! are the maximum of both (a `seq` at or below either was written by some
//! archiver). On revocation the writer commits and the offsets are committed
//! synchronously before the partitions are given up.
//!
//! Offset resets. A checkpoint's position is only meaningful in the log it
//! was taken from. Before assigning a partition, and every 5 s while
//! consuming, the archiver compares the partition's position and cluster id
//! with the broker's: another cluster id, or a log that ends below the next
//! offset (or a record delivered below it: librdkafka reset the fetch
//! position), is an offset reset. It is logged once with the offsets,
//! counted, and handled by `archive.on-offset-reset`: `fail` exits naming
//! it, `restart` archives the new log from its beginning (the `seq` marks
//! stay: the files hold those records). A log that starts above the next
//! offset lost records to retention: logged and counted, archiving goes on.
//!
//! An assignment needs the group's committed offsets, the cluster id and
//! the watermarks; when one of them cannot be read, nothing is consumed
//! from a guess: the partitions are not assigned and the assignment is
//! retried from the poll loop (backoff 0.5 s doubling to 10 s, each retry
//! logged and counted).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde_json::{json, Value};

use super::config::OnOffsetReset;
use super::http::ArchiveStatus;
use super::writer::Writer;

/// The headers replay puts on every record (`replay::producer`); named
/// here so that the archive does not depend on replay, which uses it.
const HEADER_INSTANCE: &str = "instance";
const HEADER_SEQ: &str = "seq";

/// Kafka's default `offset.metadata.max.bytes` is 4096.
const MAX_METADATA: usize = 4000;

/// How long one read of the group's offsets, the cluster id or a
/// partition's watermarks may take during an assignment.
const ASSIGN_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry backoff of an assignment that could not be planned.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Part {
    /// Next offset to archive (everything below is in the files).
    next: i64,
    /// Highest `seq` written per instance.
    high: BTreeMap<String, u64>,
    /// The Kafka cluster id of the log `next` is a position in; None in a
    /// checkpoint from before it was kept (adopted at the next assignment).
    cluster: Option<String>,
    /// Retention gaps below this offset were counted (not persisted).
    gap_counted_to: i64,
}

/// What the broker says about a partition now.
struct Seen {
    cluster: Option<String>,
    low: i64,
    high: i64,
}

#[derive(Debug, PartialEq)]
enum Verdict {
    Same,
    /// The broker's log is not the one `next` is a position in.
    Reset(&'static str),
    /// Retention removed offsets `next..low` before they were archived.
    Gap,
}

/// Whether a position (`next`, taken in `cluster`'s log) still describes
/// the log the broker has.
fn check(next: i64, cluster: Option<&str>, seen: &Seen) -> Verdict {
    if let (Some(ours), Some(now)) = (cluster, seen.cluster.as_deref()) {
        if ours != now {
            return Verdict::Reset("the cluster id differs from the checkpoint's");
        }
    }
    if next > seen.high {
        return Verdict::Reset("the partition's log ends below the next offset to archive");
    }
    // A fresh position (0) below the log start is a topic under retention
    // the archive never read, not a loss.
    if next > 0 && next < seen.low {
        return Verdict::Gap;
    }
    Verdict::Same
}

/// An assignment waiting for a retry.
struct Retry {
    ids: Vec<i32>,
    attempt: u32,
    at: Instant,
}

/// Why an assignment did not happen.
enum NotAssigned {
    /// Something it needs could not be read; try again later.
    Retry(String),
    /// An offset reset under `on-offset-reset = "fail"`.
    Fail(String),
}

struct Inner {
    writer: Writer,
    topic: String,
    parts: BTreeMap<i32, Part>,
    assigned: Vec<i32>,
    /// Records appended since the last commit.
    pending: u64,
    /// Partitions whose offset moved since the last Kafka commit.
    uncommitted: bool,
    /// Set after a failure: the loop exits and the process restarts.
    failed: Option<String>,
    on_reset: OnOffsetReset,
    /// Partitions given to us whose assignment waits for a retry.
    retry: Option<Retry>,
    /// The cluster id the client talks to, read at each assignment and
    /// when librdkafka reports a change (`Ctx::log`). Read only then:
    /// rdkafka 0.39's `fetch_cluster_id` leaks the string librdkafka
    /// allocates for it (`rd_kafka_clusterid` wants `rd_kafka_mem_free`).
    cluster: Option<String>,
}

impl Inner {
    fn progress(&self) -> Value {
        let parts: serde_json::Map<String, Value> = self
            .parts
            .iter()
            .map(|(p, s)| {
                let mut v = json!({"next": s.next, "high": s.high});
                if let Some(c) = &s.cluster {
                    v["cluster"] = json!(c);
                }
                (p.to_string(), v)
            })
            .collect();
        json!({"topic": self.topic, "partitions": parts})
    }

    fn restore(&mut self, progress: &Value) {
        if progress.get("topic").and_then(Value::as_str) != Some(self.topic.as_str()) {
            if !progress.is_null() {
                tracing::warn!(?progress, topic = %self.topic,
                    "archive: checkpoint is for another topic; starting from the group's offsets");
            }
            return;
        }
        let Some(parts) = progress.get("partitions").and_then(Value::as_object) else {
            return;
        };
        for (p, v) in parts {
            let Ok(p) = p.parse::<i32>() else { continue };
            let next = v.get("next").and_then(Value::as_i64).unwrap_or(0);
            let high = v
                .get("high")
                .and_then(|h| serde_json::from_value(h.clone()).ok())
                .unwrap_or_default();
            // Absent in checkpoints written before the cluster id was kept.
            let cluster = v.get("cluster").and_then(Value::as_str).map(String::from);
            self.parts.insert(
                p,
                Part {
                    next,
                    high,
                    cluster,
                    gap_counted_to: 0,
                },
            );
        }
    }

    /// Logs and counts an offset reset of partition `p` (position `next`
    /// in the checkpoint's log, `seen` the broker's); Err with the message
    /// to exit with under `on-offset-reset = "fail"`.
    fn offset_reset(
        &self,
        status: &ArchiveStatus,
        p: i32,
        reason: &str,
        next: i64,
        seen: &Seen,
    ) -> Result<(), String> {
        let topic = &self.topic;
        let ours = self.parts.get(&p).and_then(|s| s.cluster.as_deref());
        if let Ok(mut m) = status.offset_resets.lock() {
            *m.entry((topic.clone(), p)).or_default() += 1;
        }
        tracing::error!(topic = %topic, partition = p, next, checkpoint_cluster = ?ours,
            cluster = ?seen.cluster, log_start = seen.low, log_end = seen.high,
            policy = ?self.on_reset,
            "archive: offset reset: {reason}; offsets {}..{} of the checkpoint's log are not in this one",
            seen.low.min(next), next);
        match self.on_reset {
            OnOffsetReset::Fail => Err(format!(
                "offset reset on topic {topic} partition {p}: {reason} (the archive's next offset \
                 is {next} in cluster {}, the broker's log is {}..{} in cluster {}); \
                 archive.on-offset-reset is \"fail\", so nothing is archived from it. Check the \
                 brokers; to archive the new log from its beginning set archive.on-offset-reset = \
                 \"restart\" (the files already written stay)",
                ours.unwrap_or("unknown"),
                seen.low,
                seen.high,
                seen.cluster.as_deref().unwrap_or("unknown"),
            )),
            OnOffsetReset::Restart => Ok(()),
        }
    }

    /// Logs and counts, once per range, the offsets retention removed
    /// before they were archived (`next..seen.low`). Nothing else to do:
    /// the broker resumes the partition at its log start.
    fn retention_gap(&mut self, status: &ArchiveStatus, p: i32, seen: &Seen) {
        let topic = self.topic.clone();
        let part = self.parts.entry(p).or_default();
        let from = part.next.max(part.gap_counted_to);
        if seen.low <= from {
            return;
        }
        part.gap_counted_to = seen.low;
        if let Ok(mut m) = status.retention_skipped.lock() {
            *m.entry((topic.clone(), p)).or_default() += (seen.low - from) as u64;
        }
        tracing::error!(topic = %topic, partition = p, from, to = seen.low,
            "archive: retention removed offsets {from}..{} before they were archived", seen.low);
    }

    /// Reads what assigning `ids` needs (the group's committed offsets, the
    /// cluster id, each partition's watermarks) and decides where each
    /// partition starts. Nothing changes unless everything was read and no
    /// partition fails.
    fn plan(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        status: &ArchiveStatus,
        ids: &[i32],
    ) -> Result<TopicPartitionList, NotAssigned> {
        let topic = self.topic.clone();
        let mut want = TopicPartitionList::new();
        for p in ids {
            want.add_partition(&topic, *p);
        }
        let retry = NotAssigned::Retry;
        let committed = consumer
            .committed_offsets(want, ASSIGN_TIMEOUT)
            .map_err(|e| retry(format!("reading the group's committed offsets: {e}")))?;
        if let Some(c) = consumer.client().fetch_cluster_id(ASSIGN_TIMEOUT) {
            self.cluster = Some(c);
        }
        let cluster = self.cluster.clone();
        let mut read = Vec::with_capacity(ids.len());
        for p in ids {
            let e = committed
                .find_partition(&topic, *p)
                .ok_or_else(|| retry(format!("no committed offset returned for partition {p}")))?;
            e.error().map_err(|err| {
                retry(format!(
                    "reading the group's committed offset of partition {p}: {err}"
                ))
            })?;
            let group_next = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            let group_high: BTreeMap<String, u64> =
                serde_json::from_str(e.metadata()).unwrap_or_default();
            let (low, high) = consumer
                .fetch_watermarks(&topic, *p, ASSIGN_TIMEOUT)
                .map_err(|e| retry(format!("reading the watermarks of partition {p}: {e}")))?;
            let seen = Seen {
                cluster: cluster.clone(),
                low,
                high,
            };
            read.push((*p, group_next, group_high, seen));
        }
        // Decide first, change afterwards: a failing partition leaves every
        // position as it was (the revocation at exit commits them).
        let mut resets = Vec::new();
        let mut fail = None;
        for (p, group_next, _, seen) in &read {
            let part = self.parts.get(p);
            let ours = part.map_or(0, |s| s.next);
            let next = ours.max(*group_next);
            if let Verdict::Reset(reason) =
                check(next, part.and_then(|s| s.cluster.as_deref()), seen)
            {
                // Every reset is logged and counted, the first one failing
                // names itself in the exit message.
                if let Err(msg) = self.offset_reset(status, *p, reason, next, seen) {
                    fail.get_or_insert(msg);
                }
                resets.push(*p);
            }
        }
        if let Some(msg) = fail {
            return Err(NotAssigned::Fail(msg));
        }
        let mut assign = TopicPartitionList::new();
        for (p, group_next, group_high, seen) in read {
            if let Ok(mut m) = status.offset_resets.lock() {
                m.entry((topic.clone(), p)).or_default();
            }
            let part = self.parts.entry(p).or_default();
            if resets.contains(&p) {
                // `restart`: the old log's position is meaningless here, and
                // so may the group's be (committed before the reset was
                // seen): the new log from its beginning. The seq marks stay
                // (the files hold those records), and the group's are merged
                // below: what another archiver of the group already took
                // from the new log is dropped as duplicates, not skipped.
                part.next = 0;
                part.gap_counted_to = 0;
                tracing::warn!(topic = %topic, partition = p, start = part.next,
                    "archive: archiving the new log from its beginning (on-offset-reset = restart)");
            } else {
                if group_next > part.next {
                    tracing::info!(partition = p, ours = part.next, group = group_next,
                        "archive: the group is ahead of our checkpoint (another archiver owned the partition)");
                }
                part.next = part.next.max(group_next);
            }
            if part.cluster.is_none() || resets.contains(&p) {
                part.cluster = seen.cluster.clone().or(part.cluster.take());
            }
            for (i, s) in group_high {
                let h = part.high.entry(i).or_insert(0);
                *h = (*h).max(s);
            }
            let start = if part.next > 0 {
                Offset::Offset(part.next)
            } else {
                Offset::Beginning
            };
            if check(part.next, None, &seen) == Verdict::Gap {
                self.retention_gap(status, p, &seen);
            }
            let _ = assign.add_partition_offset(&topic, p, start);
        }
        if !resets.is_empty() {
            // The new positions reach the checkpoint with the next commit.
            self.uncommitted = true;
        }
        Ok(assign)
    }

    /// Assigns `ids` (given by a rebalance, or retried) if [`Inner::plan`]
    /// can; otherwise consumes nothing and schedules a retry, or fails.
    fn try_assign(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        status: &ArchiveStatus,
        ids: Vec<i32>,
        attempt: u32,
    ) {
        match self.plan(consumer, status, &ids) {
            Ok(tpl) => {
                tracing::info!(partitions = ?ids, "archive: partitions assigned");
                if let Err(e) = consumer.assign(&tpl) {
                    self.failed = Some(format!("assign: {e}"));
                    return;
                }
                self.assigned = ids;
                status.ready.store(true, Relaxed);
            }
            Err(NotAssigned::Retry(reason)) => {
                status.assignment_retries.fetch_add(1, Relaxed);
                status.ready.store(false, Relaxed);
                let delay = RETRY_FIRST
                    .saturating_mul(1 << attempt.min(6))
                    .min(RETRY_MAX);
                tracing::warn!(partitions = ?ids, attempt = attempt + 1, retry_in_ms = delay.as_millis() as u64,
                    reason = %reason,
                    "archive: cannot start the assigned partitions yet; consuming nothing until it can");
                // Acknowledge the rebalance with nothing assigned: no record
                // is read from a guessed position.
                if attempt == 0 {
                    let _ = consumer.assign(&TopicPartitionList::new());
                }
                self.assigned.clear();
                self.retry = Some(Retry {
                    ids,
                    attempt: attempt + 1,
                    at: Instant::now() + delay,
                });
            }
            Err(NotAssigned::Fail(msg)) => {
                status.ready.store(false, Relaxed);
                let _ = consumer.assign(&TopicPartitionList::new());
                self.assigned.clear();
                self.failed = Some(msg);
            }
        }
    }

    /// While consuming: the broker's view of partition `p` (1 s timeout
    /// each), None if it cannot be read now.
    fn observe(&self, consumer: &BaseConsumer<Ctx>, p: i32) -> Option<Seen> {
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, p, Duration::from_secs(1))
            .ok()?;
        Some(Seen {
            cluster: self.cluster.clone(),
            low,
            high,
        })
    }

    /// While consuming: applies [`check`] to partition `p` (`below`: a
    /// record arrived below the next offset, a reset whatever the
    /// watermarks say now). A reset fails or restarts the partition at the
    /// new log's beginning (a seek; librdkafka discards what it fetched
    /// from the old position).
    fn recheck(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        status: &ArchiveStatus,
        p: i32,
        seen: &Seen,
        below: bool,
    ) {
        let (next, cluster) = match self.parts.get(&p) {
            Some(s) => (s.next, s.cluster.clone()),
            None => return,
        };
        let verdict = match check(next, cluster.as_deref(), seen) {
            Verdict::Same | Verdict::Gap if below => Verdict::Reset(
                "a record was delivered below the next offset to archive (the fetch position was out of range)",
            ),
            v => v,
        };
        match verdict {
            Verdict::Same => {}
            Verdict::Gap => self.retention_gap(status, p, seen),
            Verdict::Reset(reason) => {
                if let Err(msg) = self.offset_reset(status, p, reason, next, seen) {
                    status.ready.store(false, Relaxed);
                    self.failed = Some(msg);
                    return;
                }
                let topic = self.topic.clone();
                let part = self.parts.entry(p).or_default();
                part.next = 0;
                part.gap_counted_to = 0;
                part.cluster = seen.cluster.clone().or(part.cluster.take());
                self.uncommitted = true;
                // Dying here: the checkpoint still holds the old position and
                // cluster; the next start detects the reset again.
                if let Err(e) = consumer.seek(&topic, p, Offset::Beginning, Duration::from_secs(10))
                {
                    self.failed = Some(format!("seek {topic}/{p} to the new log's beginning: {e}"));
                    return;
                }
                tracing::warn!(topic = %topic, partition = p,
                    "archive: archiving the new log from its beginning (on-offset-reset = restart)");
            }
        }
    }

    /// Writer commit, then Kafka commit of `partitions`' offsets. The Kafka
    /// commit never runs before the checkpoint is durable: a crash in
    /// between leaves Kafka behind, and the checkpoint wins on restart.
    fn commit(
        &mut self,
        consumer: &BaseConsumer<Ctx>,
        status: &ArchiveStatus,
        partitions: &[i32],
        mode: CommitMode,
    ) -> Result<(), String> {
        let started = Instant::now();
        let progress = self.progress();
        self.writer
            .commit(&progress)
            .map_err(|e| format!("archive commit: {e}"))?;
        status
            .commit_micros_total
            .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        self.pending = 0;
        // Dying here: the checkpoint is ahead of Kafka; on restart the
        // checkpoint's offsets win (a rebalance meanwhile: see the README).
        super::debug_pause("kafka");
        if !self.uncommitted {
            return Ok(());
        }
        let now = self.cluster.clone();
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let Some(s) = self.parts.get(p) else { continue };
            if s.next <= 0 {
                continue;
            }
            if let (Some(ours), Some(now)) = (&s.cluster, &now) {
                if ours != now {
                    // A position in another cluster's log must not become
                    // this cluster's group offset (the reset check handles
                    // the partition; the checkpoint keeps the position).
                    tracing::warn!(partition = p, checkpoint_cluster = %ours, cluster = %now,
                        "archive: not committing an offset of another cluster's log");
                    continue;
                }
            }
            let mut e = tpl.add_partition(&self.topic, *p);
            if e.set_offset(Offset::Offset(s.next)).is_err() {
                continue;
            }
            let meta = serde_json::to_string(&s.high).unwrap_or_default();
            if meta.len() <= MAX_METADATA {
                e.set_metadata(meta);
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => self.uncommitted = false,
            // Not fatal: the checkpoint has the offsets; the next commit
            // retries, and a restart seeks from the checkpoint.
            Err(e) => {
                status.kafka_commit_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "archive: Kafka offset commit failed (checkpoint is durable)");
            }
        }
        Ok(())
    }
}

struct Ctx {
    inner: Arc<Mutex<Inner>>,
    status: Arc<ArchiveStatus>,
    /// Set when librdkafka logs a new cluster id; an atomic, not `inner`:
    /// librdkafka logs from its own threads, which the poll loop may wait
    /// for while holding `inner`.
    cluster_changed: Arc<AtomicBool>,
    /// librdkafka's errors and warnings, and the poll loop's consumer
    /// errors, through one rate limit.
    limiter: Arc<Mutex<LogLimiter>>,
}

impl Ctx {
    /// Whether to log `key` now, and how many lines like it were
    /// suppressed since the last one (counted in
    /// `sluice_archive_kafka_log_suppressed_total`).
    fn admit(&self, key: &str) -> Option<u64> {
        let verdict = match self.limiter.lock() {
            Ok(mut l) => l.admit(key, Instant::now()),
            Err(_) => Some(0),
        };
        if verdict.is_none() {
            self.status.kafka_log_suppressed.fetch_add(1, Relaxed);
        }
        verdict
    }
}

impl ClientContext for Ctx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        // "ClusterId update" (debug) or "reports different ClusterId"
        // (warning): the brokers behind the bootstrap address changed.
        if fac == "CLUSTERID" {
            self.cluster_changed.store(true, Relaxed);
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning => {
                let Some(suppressed) = self.admit(log_message) else {
                    return;
                };
                if matches!(level, L::Warning) {
                    tracing::warn!(target: "librdkafka", suppressed, "librdkafka: {fac} {log_message}");
                } else {
                    tracing::error!(target: "librdkafka", suppressed, "librdkafka: {fac} {log_message}");
                }
            }
            _ => rdkafka::client::DefaultClientContext.log(level, fac, log_message),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if let Some(suppressed) = self.admit(reason) {
            tracing::error!(target: "librdkafka", suppressed, "librdkafka: {error}: {reason}");
        }
    }
}

/// One log line per distinct message per [`LogLimiter::WINDOW`]: with the
/// brokers down librdkafka reports every failed connect and every poll
/// returns the same error, about 40 lines a second. Messages that differ
/// only in numbers (ports, durations, counts) are one message. The first
/// of a kind is logged at once; the next one logged, a window later,
/// carries how many were suppressed in between. Memory is bounded: at
/// [`LogLimiter::KINDS`] kinds the table is cleared (the next of each kind
/// is logged again).
pub(crate) struct LogLimiter {
    kinds: std::collections::HashMap<String, (Instant, u64)>,
}

impl LogLimiter {
    pub(crate) const WINDOW: Duration = Duration::from_secs(30);
    const KINDS: usize = 256;

    pub(crate) fn new() -> Self {
        LogLimiter {
            kinds: Default::default(),
        }
    }

    /// `Some(suppressed since the last line)` to log now, `None` to
    /// suppress.
    pub(crate) fn admit(&mut self, message: &str, now: Instant) -> Option<u64> {
        let key = Self::kind(message);
        if let Some((last, suppressed)) = self.kinds.get_mut(&key) {
            if now.saturating_duration_since(*last) < Self::WINDOW {
                *suppressed += 1;
                return None;
            }
            let n = std::mem::take(suppressed);
            *last = now;
            return Some(n);
        }
        if self.kinds.len() >= Self::KINDS {
            self.kinds.clear();
        }
        self.kinds.insert(key, (now, 0));
        Some(0)
    }

    /// What makes two messages the same: librdkafka's thread prefix
    /// (`[thrd:...]: `) and its `(after 0ms in state CONNECT, 1 identical
    /// error(s) suppressed)` tail dropped, so that its log line and its
    /// error callback for one failed connect are one kind, and digit runs
    /// collapsed.
    fn kind(message: &str) -> String {
        let mut text = message;
        if let Some(i) = text.find("[thrd:") {
            if let Some(j) = text[i..].find("]: ") {
                text = &text[i + j + 3..];
            }
        }
        if let Some(i) = text.find(" (after ") {
            text = &text[..i];
        }
        let mut key = String::with_capacity(text.len().min(512));
        let mut in_digits = false;
        for c in text.chars().take(512) {
            if c.is_ascii_digit() {
                if !in_digits {
                    key.push('#');
                }
                in_digits = true;
            } else {
                key.push(c);
                in_digits = false;
            }
        }
        key
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let ids: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                inner.retry = None;
                inner.try_assign(consumer, &self.status, ids, 0);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Everything read from these partitions is made durable and
                // its offsets committed before another archiver may start
                // on them from the group's offset.
                let ids = std::mem::take(&mut inner.assigned);
                inner.retry = None;
                inner.uncommitted = true;
                if let Err(e) = inner.commit(consumer, &self.status, &ids, CommitMode::Sync) {
                    inner.failed = Some(e);
                }
                tracing::info!(partitions = ?ids, "archive: partitions revoked (committed)");
                if let Ok(mut lag) = self.status.lag.lock() {
                    lag.clear();
                }
                let _ = consumer.unassign();
            }
            other => {
                tracing::error!(error = ?other, "archive: rebalance error");
                inner.retry = None;
                let _ = consumer.unassign();
            }
        }
    }
}

/// What `run` needs besides the writer.
pub struct Source {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub properties: BTreeMap<String, String>,
    pub commit_interval: Duration,
    pub commit_records: u64,
    /// Delete hourly files older than this (summaries stay); None keeps all.
    pub retention: Option<Duration>,
    /// `archive.on-offset-reset`.
    pub on_reset: OnOffsetReset,
    /// `group.instance.id` (static membership), from [`member_id`].
    pub group_instance_id: Option<String>,
}

/// Name of the file in the archive directory that holds the archiver's
/// static group membership id.
pub const MEMBER_ID_FILE: &str = "member-id";

/// The archive directory's `group.instance.id`: `sluice-archive-<uuid>`,
/// the UUID read from `DIR/member-id` or created there durably
/// (`member-id.tmp`, fsync, rename, directory fsync). An id belongs to the
/// directory, not to the host: a directory moved to another host keeps its
/// partitions; two archivers started on copies of one directory share an
/// id and the broker fences one of them (it exits naming the error).
///
/// Dying before the rename leaves no id (or a `.tmp` the next start
/// overwrites); after it and before the directory fsync a power cut may
/// lose the name, and the next start creates another id: the group then
/// sees a new member, as without static membership, once.
pub fn member_id(dir: &std::path::Path) -> Result<String, String> {
    let path = dir.join(MEMBER_ID_FILE);
    let uuid = match std::fs::read(&path) {
        Ok(bytes) => {
            let text = std::str::from_utf8(&bytes)
                .unwrap_or("")
                .trim_end_matches('\n');
            match uuid::Uuid::parse_str(text) {
                Ok(u) if u.hyphenated().to_string() == text => text.to_string(),
                _ => {
                    return Err(format!(
                        "{} does not hold a member id (a UUID): restore it, or remove it to join the group as a new static member",
                        path.display()
                    ))
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::now_v7().hyphenated().to_string();
            crate::storage::durable::write_file_durable(&path, format!("{id}\n").as_bytes())
                .map_err(|e| format!("creating {}: {e}", path.display()))?;
            tracing::info!(file = %path.display(), "archive: new static member id created");
            id
        }
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    Ok(format!("sluice-archive-{uuid}"))
}

/// How often a member that holds no partition says so at info.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(10);

/// Consumes until `stop` is set (then commits and seals) or a failure.
pub fn run(
    writer: Writer,
    progress: Value,
    src: Source,
    status: Arc<ArchiveStatus>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut inner = Inner {
        writer,
        topic: src.topic.clone(),
        parts: BTreeMap::new(),
        assigned: Vec::new(),
        pending: 0,
        uncommitted: false,
        failed: None,
        on_reset: src.on_reset,
        retry: None,
        cluster: None,
    };
    inner.restore(&progress);
    let inner = Arc::new(Mutex::new(inner));
    let mut cfg = ClientConfig::new();
    // librdkafka's warnings reach `Ctx::log` (the CLUSTERID one detects a
    // cluster change) even when the log filter hides them: rdkafka derives
    // librdkafka's level from the filter of target `librdkafka`.
    {
        use rdkafka::config::RDKafkaLogLevel as L;
        if matches!(cfg.log_level, L::Emerg | L::Alert | L::Critical | L::Error) {
            cfg.set_log_level(L::Warning);
        }
    }
    cfg.set("bootstrap.servers", &src.brokers)
        .set("enable.partition.eof", "false");
    for (k, v) in &src.properties {
        cfg.set(k, v);
    }
    // A fetch position out of range restarts at the log start, where the
    // record below `next` that follows is detected as an offset reset
    // (`auto.offset.reset` is refused in `archive.librdkafka`).
    cfg.set("auto.offset.reset", "earliest")
        .set("group.id", &src.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    if let Some(id) = &src.group_instance_id {
        cfg.set("group.instance.id", id);
    }
    let cluster_changed = Arc::new(AtomicBool::new(false));
    let limiter = Arc::new(Mutex::new(LogLimiter::new()));
    let ctx = Ctx {
        inner: inner.clone(),
        status: status.clone(),
        cluster_changed: cluster_changed.clone(),
        limiter: limiter.clone(),
    };
    let consumer: BaseConsumer<Ctx> = cfg
        .create_with_context(ctx)
        .map_err(|e| format!("consumer: {e}"))?;
    consumer
        .subscribe(&[&src.topic])
        .map_err(|e| format!("subscribe {}: {e}", src.topic))?;
    let member = cfg.get("group.instance.id").unwrap_or("").to_string();
    tracing::info!(topic = %src.topic, group = %src.group_id, group_instance_id = %member,
        "archive: subscribed; waiting for the group to assign partitions");
    let started = Instant::now();
    // Since when this member holds no partition, and when it last said so.
    let mut idle_since = Some(started);
    let mut idle_logged = started;
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now() - Duration::from_secs(60);
    let mut last_retention = None;
    while !stop.load(Relaxed) {
        let msg = consumer.poll(Duration::from_millis(100));
        let mut g = inner.lock().map_err(|_| "archive state poisoned")?;
        if let Some(e) = g.failed.take() {
            return Err(e);
        }
        if let Some(r) = g.retry.take_if(|r| r.at <= Instant::now()) {
            g.try_assign(&consumer, &status, r.ids, r.attempt);
            if let Some(e) = g.failed.take() {
                return Err(e);
            }
        }
        match msg {
            None => {}
            Some(Err(e)) => {
                // A fatal error (FENCED_INSTANCE_ID: another process joined
                // with this directory's member id) leaves a consumer that
                // never reads again: exit, so that it is seen.
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    let hint = if member.is_empty() {
                        String::new()
                    } else {
                        format!("; with group.instance.id {member}, another archiver may be running on a copy of this archive directory (its {MEMBER_ID_FILE} file)")
                    };
                    return Err(format!(
                        "fatal Kafka consumer error {code:?}: {reason}{hint}"
                    ));
                }
                let verdict = match limiter.lock() {
                    Ok(mut l) => l.admit(&format!("consumer {e}"), Instant::now()),
                    Err(_) => Some(0),
                };
                match verdict {
                    Some(suppressed) => {
                        tracing::warn!(error = %e, suppressed, "archive: consumer error")
                    }
                    None => {
                        status.kafka_log_suppressed.fetch_add(1, Relaxed);
                    }
                }
            }
            Some(Ok(m)) => {
                let p = m.partition();
                let offset = m.offset();
                let next = g.parts.get(&p).map_or(0, |s| s.next);
                if offset < next {
                    // librdkafka restarted the fetch below our position: its
                    // position was out of range (`auto.offset.reset`).
                    let seen = g.observe(&consumer, p).unwrap_or(Seen {
                        cluster: None,
                        low: -1,
                        high: -1,
                    });
                    g.recheck(&consumer, &status, p, &seen, true);
                    if let Some(e) = g.failed.take() {
                        return Err(e);
                    }
                    continue;
                }
                let part = g.parts.entry(p).or_default();
                part.next = offset + 1;
                let (mut inst, mut seq) = (None, None);
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        match hd.key {
                            HEADER_INSTANCE => {
                                inst = hd.value.and_then(|v| std::str::from_utf8(v).ok())
                            }
                            HEADER_SEQ => {
                                seq = hd
                                    .value
                                    .and_then(|v| std::str::from_utf8(v).ok())
                                    .and_then(|s| s.parse::<u64>().ok())
                            }
                            _ => {}
                        }
                    }
                }
                let admit = match (inst, seq) {
                    (Some(i), Some(s)) => {
                        let h = part.high.entry(i.to_string()).or_insert(0);
                        if s <= *h {
                            false
                        } else {
                            *h = s;
                            true
                        }
                    }
                    _ => {
                        status.unmarked.fetch_add(1, Relaxed);
                        true
                    }
                };
                g.uncommitted = true;
                if admit {
                    let value = m.payload().unwrap_or_default();
                    let pos = json!({"topic": m.topic(), "partition": p, "offset": offset});
                    g.writer
                        .append(value, &pos)
                        .map_err(|e| format!("archive append: {e}"))?;
                    g.pending += 1;
                } else {
                    status.duplicates.fetch_add(1, Relaxed);
                }
            }
        }
        // A quiet topic still seals: with hours open, a commit every
        // `idle-close-secs` seals (and compresses) those idle that long.
        // Before, only the next record's commit sealed them (27 s open with
        // idle-close-secs = 2). wants_commit: more open hours than
        // archive.max-open-hours allows before some must be sealed (which
        // only a commit does).
        let idle_close = g.writer.options().idle_close;
        let due = g.pending >= src.commit_records
            || g.writer.wants_commit()
            || ((g.pending > 0 || g.uncommitted) && last_commit.elapsed() >= src.commit_interval)
            || (g.writer.open_files() > 0 && last_commit.elapsed() >= idle_close);
        if due {
            let ids = g.assigned.clone();
            g.commit(&consumer, &status, &ids, CommitMode::Sync)?;
            last_commit = Instant::now();
        }
        if let Some(keep) = src.retention {
            let now = super::Hour::now();
            if last_retention != Some(now) {
                last_retention = Some(now);
                let cutoff = super::Hour(now.0 - (keep.as_secs() / 3600) as i64);
                g.writer
                    .remove_hours_before(cutoff)
                    .map_err(|e| format!("archive retention: {e}"))?;
            }
        }
        if cluster_changed.swap(false, Relaxed) {
            if let Some(c) = consumer.client().fetch_cluster_id(Duration::from_secs(1)) {
                if g.cluster.as_ref() != Some(&c) {
                    tracing::warn!(before = ?g.cluster, now = %c, "archive: the brokers report another cluster id");
                    g.cluster = Some(c);
                    // Check the partitions now.
                    last_lag = Instant::now() - Duration::from_secs(60);
                }
            }
        }
        // Waiting is said at info: a restarted member without static
        // membership holds nothing until the group expires its previous
        // incarnation (`session.timeout.ms`), which looks like a hang.
        match (g.assigned.is_empty(), idle_since) {
            (false, Some(since)) => {
                tracing::info!(partitions = ?g.assigned, waited_ms = since.elapsed().as_millis() as u64,
                    since_start_ms = started.elapsed().as_millis() as u64, "archive: holding partitions");
                idle_since = None;
            }
            (true, None) => {
                idle_since = Some(Instant::now());
                idle_logged = Instant::now();
            }
            (true, Some(since)) if idle_logged.elapsed() >= WAITING_LOG_EVERY => {
                idle_logged = Instant::now();
                let static_note = if member.is_empty() {
                    "no static membership: after a restart the group gives partitions back only once it expired the previous member (session.timeout.ms)"
                } else {
                    "static member: a restart within session.timeout.ms takes its partitions back at once; with more members than partitions some hold none"
                };
                tracing::info!(group = %src.group_id, topic = %src.topic, group_instance_id = %member,
                    waited_secs = since.elapsed().as_secs(), note = static_note,
                    "archive: waiting for the group to assign partitions");
            }
            _ => {}
        }
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            let mut lag = BTreeMap::new();
            for p in g.assigned.clone() {
                let Some(seen) = g.observe(&consumer, p) else {
                    continue;
                };
                // Not clamped: below 0 the log ends below our position.
                let next = g.parts.get(&p).map_or(0, |s| s.next);
                lag.insert(p, seen.high - next);
                g.recheck(&consumer, &status, p, &seen, false);
                if let Some(e) = g.failed.take() {
                    return Err(e);
                }
            }
            if let Ok(mut l) = status.lag.lock() {
                *l = lag;
            }
        }
    }
    status.ready.store(false, Relaxed);
    let mut g = inner.lock().map_err(|_| "archive state poisoned")?;
    let ids = g.assigned.clone();
    g.uncommitted = true;
    g.commit(&consumer, &status, &ids, CommitMode::Sync)?;
    let progress = g.progress();
    g.writer
        .close_all(&progress)
        .map_err(|e| format!("archive close: {e}"))?;
    drop(g);
    consumer.unsubscribe();
    tracing::info!("archive: stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(cluster: Option<&str>, low: i64, high: i64) -> Seen {
        Seen {
            cluster: cluster.map(String::from),
            low,
            high,
        }
    }

    #[test]
    fn log_limiter_says_each_kind_once_per_window_with_the_count() {
        let mut l = LogLimiter::new();
        let t0 = Instant::now();
        let a = |port: u32, ms: u32| {
            format!("Connect to ipv4#127.0.0.1:{port} failed: Connection refused (after {ms}ms in state CONNECT)")
        };
        assert_eq!(l.admit(&a(9092, 0), t0), Some(0));
        for i in 0..39 {
            assert_eq!(
                l.admit(&a(9092, i), t0 + Duration::from_millis(25 * i as u64)),
                None
            );
        }
        // Another kind is its own.
        assert_eq!(l.admit("all brokers down", t0), Some(0));
        // librdkafka's log line and its error callback for one failure are
        // one kind, with or without its own "identical error(s)" note.
        let cb = "127.0.0.1:45639/1: Connect to ipv4#127.0.0.1:45639 failed: Connection refused (after 0ms in state CONNECT)";
        let line = "[thrd:127.0.0.1:45639/1]: 127.0.0.1:45639/1: Connect to ipv4#127.0.0.1:45639 failed: Connection refused (after 0ms in state CONNECT, 1 identical error(s) suppressed)";
        assert_eq!(l.admit(line, t0), Some(0));
        assert_eq!(l.admit(cb, t0), None);
        assert_eq!(l.admit(&a(9093, 7), t0 + LogLimiter::WINDOW), Some(39));
        assert_eq!(l.admit(&a(9093, 7), t0 + LogLimiter::WINDOW), None);
        // Bounded: past KINDS the table starts over.
        for i in 0..(LogLimiter::KINDS * 2) {
            let _ = l.admit(
                &format!(
                    "kind {}",
                    char::from(b'a' + (i % 26) as u8)
                        .to_string()
                        .repeat(i / 26 + 1)
                ),
                t0,
            );
        }
        assert!(l.kinds.len() <= LogLimiter::KINDS);
    }

    #[test]
    fn member_id_is_created_once_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = member_id(dir.path()).unwrap();
        assert!(
            a.starts_with("sluice-archive-") && a.len() == 15 + 36,
            "{a}"
        );
        assert_eq!(member_id(dir.path()).unwrap(), a);
        assert!(!dir.path().join("member-id.tmp").exists());
        std::fs::write(dir.path().join(MEMBER_ID_FILE), "garbage").unwrap();
        let err = member_id(dir.path()).unwrap_err();
        assert!(err.contains("does not hold a member id"), "{err}");
    }

    #[test]
    fn check_tells_a_reset_from_a_gap_and_from_the_same_log() {
        let a = Some("A");
        // Same cluster, position inside the log (or at its end).
        assert_eq!(check(20, a, &seen(a, 0, 20)), Verdict::Same);
        assert_eq!(check(20, a, &seen(a, 5, 90)), Verdict::Same);
        // Unknown cluster on either side: the offsets alone decide.
        assert_eq!(check(20, None, &seen(a, 0, 30)), Verdict::Same);
        assert_eq!(check(20, a, &seen(None, 0, 30)), Verdict::Same);
        // Another cluster whose log is longer than our position: only the
        // cluster id shows that offsets 0..20 are not the archived ones.
        assert!(matches!(
            check(20, a, &seen(Some("B"), 0, 90)),
            Verdict::Reset(r) if r.contains("cluster id")
        ));
        // The log ends below the position (recreated topic, truncation).
        assert!(matches!(
            check(20, a, &seen(a, 0, 13)),
            Verdict::Reset(r) if r.contains("ends below")
        ));
        // Retention removed 20..25 before they were archived.
        assert_eq!(check(20, a, &seen(a, 25, 40)), Verdict::Gap);
        // A fresh position below the log start is no loss of ours.
        assert_eq!(check(0, None, &seen(a, 25, 40)), Verdict::Same);
    }

    #[test]
    fn progress_keeps_the_cluster_id_and_reads_checkpoints_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let opts = super::super::WriterOptions::new(dir.path());
        let (writer, _) = Writer::open(opts).unwrap();
        let mut inner = Inner {
            writer,
            topic: "events".into(),
            parts: BTreeMap::new(),
            assigned: Vec::new(),
            pending: 0,
            uncommitted: false,
            failed: None,
            on_reset: OnOffsetReset::Fail,
            retry: None,
            cluster: None,
        };
        // A checkpoint written before the cluster id was kept.
        inner.restore(&json!({"topic": "events",
            "partitions": {"0": {"next": 20, "high": {"i1": 58}}}}));
        assert_eq!(inner.parts[&0].next, 20);
        assert_eq!(inner.parts[&0].cluster, None);
        assert_eq!(inner.parts[&0].high["i1"], 58);
        inner.parts.get_mut(&0).unwrap().cluster = Some("c1".into());
        let p = inner.progress();
        assert_eq!(p["partitions"]["0"]["cluster"], json!("c1"));
        inner.parts.clear();
        inner.restore(&p);
        assert_eq!(inner.parts[&0].cluster.as_deref(), Some("c1"));
        assert_eq!(inner.parts[&0].next, 20);
    }
}
