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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde_json::{json, Value};

use super::http::ArchiveStatus;
use super::writer::Writer;

/// The headers replay puts on every record (`replay::producer`); named
/// here so that the archive does not depend on replay, which uses it.
const HEADER_INSTANCE: &str = "instance";
const HEADER_SEQ: &str = "seq";

/// Kafka's default `offset.metadata.max.bytes` is 4096.
const MAX_METADATA: usize = 4000;

#[derive(Default)]
struct Part {
    /// Next offset to archive (everything below is in the files).
    next: i64,
    /// Highest `seq` written per instance.
    high: BTreeMap<String, u64>,
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
}

impl Inner {
    fn progress(&self) -> Value {
        let parts: serde_json::Map<String, Value> = self
            .parts
            .iter()
            .map(|(p, s)| (p.to_string(), json!({"next": s.next, "high": s.high})))
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
            self.parts.insert(p, Part { next, high });
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
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let Some(s) = self.parts.get(p) else { continue };
            if s.next <= 0 {
                continue;
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
}

impl ClientContext for Ctx {}

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
                let topic = inner.topic.clone();
                let ids: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let committed = consumer
                    .committed_offsets(tpl.clone(), Duration::from_secs(30))
                    .map_err(|e| tracing::warn!(error = %e, "archive: reading the group's offsets"))
                    .ok();
                let mut assign = TopicPartitionList::new();
                for p in &ids {
                    let (group_next, group_high) = committed
                        .as_ref()
                        .and_then(|c| c.find_partition(&topic, *p))
                        .map(|e| {
                            let next = match e.offset() {
                                Offset::Offset(o) => o,
                                _ => 0,
                            };
                            let high: BTreeMap<String, u64> =
                                serde_json::from_str(e.metadata()).unwrap_or_default();
                            (next, high)
                        })
                        .unwrap_or_default();
                    let part = inner.parts.entry(*p).or_default();
                    if group_next > part.next {
                        tracing::info!(partition = p, ours = part.next, group = group_next,
                            "archive: the group is ahead of our checkpoint (another archiver owned the partition)");
                    }
                    part.next = part.next.max(group_next);
                    for (i, s) in group_high {
                        let h = part.high.entry(i).or_insert(0);
                        *h = (*h).max(s);
                    }
                    let start = if part.next > 0 {
                        Offset::Offset(part.next)
                    } else {
                        Offset::Beginning
                    };
                    let _ = assign.add_partition_offset(&topic, *p, start);
                }
                inner.assigned = ids.clone();
                tracing::info!(partitions = ?ids, "archive: partitions assigned");
                if let Err(e) = consumer.assign(&assign) {
                    inner.failed = Some(format!("assign: {e}"));
                }
                self.status.ready.store(true, Relaxed);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Everything read from these partitions is made durable and
                // its offsets committed before another archiver may start
                // on them from the group's offset.
                let ids = std::mem::take(&mut inner.assigned);
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
}

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
    };
    inner.restore(&progress);
    let inner = Arc::new(Mutex::new(inner));
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &src.brokers)
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    for (k, v) in &src.properties {
        cfg.set(k, v);
    }
    cfg.set("group.id", &src.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let ctx = Ctx {
        inner: inner.clone(),
        status: status.clone(),
    };
    let consumer: BaseConsumer<Ctx> = cfg
        .create_with_context(ctx)
        .map_err(|e| format!("consumer: {e}"))?;
    consumer
        .subscribe(&[&src.topic])
        .map_err(|e| format!("subscribe {}: {e}", src.topic))?;
    tracing::info!(topic = %src.topic, group = %src.group_id, "archive: consuming");
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now() - Duration::from_secs(60);
    let mut last_retention = None;
    while !stop.load(Relaxed) {
        let msg = consumer.poll(Duration::from_millis(100));
        let mut g = inner.lock().map_err(|_| "archive state poisoned")?;
        if let Some(e) = g.failed.take() {
            return Err(e);
        }
        match msg {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "archive: consumer error"),
            Some(Ok(m)) => {
                let p = m.partition();
                let offset = m.offset();
                let part = g.parts.entry(p).or_default();
                if offset < part.next {
                    // Redelivered below what the files already hold.
                    continue;
                }
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
        let due = g.pending >= src.commit_records
            || ((g.pending > 0 || g.uncommitted) && last_commit.elapsed() >= src.commit_interval);
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
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            let mut lag = BTreeMap::new();
            for p in g.assigned.clone() {
                let next = g.parts.get(&p).map_or(0, |s| s.next);
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(&src.topic, p, Duration::from_secs(1))
                {
                    lag.insert(p, (high - next).max(0));
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
