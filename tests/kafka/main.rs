//! Replay tests against librdkafka's mock cluster: the real Kafka protocol
//! over TCP on localhost, with broker-down and error-injection controls.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

mod cli;
mod daemon;
mod damage;
mod dead_letter;
mod delivery;
mod failures;
mod idempotency;
mod limits;
mod offsets;
mod ordering;
mod outage;
mod partitioning;
mod redrive;
mod streams;
#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use sluice::config::{KafkaConfig, ReplayConfig};
use sluice::dev::consume::{consume, Consumed};
use sluice::replay::dead_letter::DeadLetterFile;
use sluice::replay::offsets::OffsetStore;
use sluice::replay::replayer::Replayer;
use sluice::replay::ReplayStats;
use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{Record, Wal, WalConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const TOPIC: &str = "events";
pub const DLQ: &str = "events-dlq";

pub fn cluster(partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let c = MockCluster::new(1).unwrap();
    c.create_topic(TOPIC, partitions, 1).unwrap();
    c.create_topic(DLQ, 1, 1).unwrap();
    c
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub wal: Arc<Wal>,
    pub offsets: Arc<OffsetStore>,
    pub stats: Arc<ReplayStats>,
}

pub fn wal_cfg(dir: &Path) -> WalConfig {
    let mut c = WalConfig::new(dir);
    c.segment_bytes = 4096;
    c.min_free_bytes = 0;
    c
}

impl Node {
    /// A node with its own temp data directory.
    pub fn temp() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let offsets = Arc::new(OffsetStore::open(&dir.path().join("offsets")).unwrap());
        let wal = Arc::new(
            Wal::open(
                wal_cfg(dir.path()),
                Arc::new(StdFs) as Arc<dyn Filesystem>,
                0,
            )
            .unwrap()
            .0,
        );
        Node {
            dir,
            wal,
            offsets,
            stats: Arc::default(),
        }
    }

    /// Appends events `{tenant, n}` with ids `prefix-n`; returns the last seq.
    pub fn append(&self, prefix: &str, tenants: &[&str], count: usize) -> u64 {
        let mut last = 0;
        for chunk in (0..count).collect::<Vec<_>>().chunks(50) {
            let payloads = chunk
                .iter()
                .map(|&n| event(prefix, tenants[n % tenants.len()], n, 0).encode())
                .collect();
            last = tokio::task::block_in_place(|| self.wal.append_blocking(payloads))
                .unwrap()
                .last;
        }
        last
    }

    pub fn start(
        &self,
        brokers: &str,
        tweak: impl FnOnce(&mut KafkaConfig, &mut ReplayConfig),
    ) -> Running {
        let mut kafka = KafkaConfig {
            message_timeout_ms: 5_000,
            linger_ms: 1,
            ..KafkaConfig::default()
        };
        let mut cfg = ReplayConfig {
            commit_interval_ms: 50,
            backoff_initial_ms: 50,
            backoff_max_ms: 500,
            ..ReplayConfig::default()
        };
        tweak(&mut kafka, &mut cfg);
        // As `serve` does when it opens the WAL: records already there may
        // have been produced by a build that let librdkafka partition.
        self.offsets
            .set_pinning_since(self.wal.durable().borrow().next_seq)
            .unwrap();
        let streams = sluice::replay::StreamTopics::default_only(&kafka);
        let replayer = Replayer {
            streams,
            wal: self.wal.clone(),
            offsets: self.offsets.clone(),
            kafka,
            brokers: brokers.to_string(),
            cfg,
            stats: self.stats.clone(),
            dead_letter: DeadLetterFile::new(self.dir.path()),
            drain: Duration::from_secs(5),
            files: None,
            routes: Default::default(),
        };
        let (stop, rx) = watch::channel(false);
        Running {
            stop,
            task: tokio::spawn(replayer.run(rx)),
        }
    }

    /// Waits until every record up to `seq` is confirmed (and committed).
    pub async fn wait_committed(&self, seq: u64, within: Duration) {
        let t0 = Instant::now();
        while self.stats.committed.load(Ordering::Relaxed) < seq {
            assert!(
                t0.elapsed() < within,
                "committed {} of {seq}: {:?}",
                self.stats.committed.load(Ordering::Relaxed),
                self.stats
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub struct Running {
    pub stop: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

impl Running {
    pub async fn shutdown(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("replayer stops")
            .unwrap();
    }
}

/// An event record as ingest would build it.
pub fn event(prefix: &str, tenant: &str, n: usize, pad: usize) -> Record {
    let id = format!("{prefix}-{n}");
    let value = serde_json::json!({"id": id, "tenant_id": tenant, "n": n, "pad": "x".repeat(pad)});
    Record {
        stream: sluice::wal::DEFAULT_STREAM.to_string(),
        key: Some(tenant.as_bytes().to_vec()),
        value: serde_json::to_vec(&value).unwrap(),
        headers: vec![
            ("id".into(), id.into_bytes()),
            ("tenant".into(), tenant.as_bytes().to_vec()),
        ],
        timestamp_ms: 1_714_564_800_000 + n as i64,
    }
}

/// Everything in `topic`, read until idle.
pub async fn read_topic(brokers: &str, topic: &str) -> Vec<Consumed> {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        consume(&b, &t, true, None, Duration::from_secs(2), |c| out.push(c)).unwrap();
        out
    })
    .await
    .unwrap()
}

/// id -> how many times it was consumed.
pub fn id_counts(records: &[Consumed]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in records {
        *m.entry(r.header("id").unwrap().to_string()).or_insert(0) += 1;
    }
    m
}
