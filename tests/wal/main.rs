//! WAL integration tests: real files and real fsync unless a test says it
//! uses the simulated disk (`SimFs`) to model crashes and faults.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

mod basic;
mod cli;
mod config_rules;
mod crash;
mod daemon;
mod damage;
mod fuzz_seeds;
mod model;
#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;

use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{ReadItem, Record, Wal, WalConfig};

/// A record whose value names it, so tests can check content, not counts.
pub fn rec(tag: &str) -> Vec<u8> {
    Record {
        stream: sluice::wal::DEFAULT_STREAM.to_string(),
        key: Some(b"tenant".to_vec()),
        value: tag.as_bytes().to_vec(),
        headers: vec![("id".into(), tag.as_bytes().to_vec())],
        timestamp_ms: 1_700_000_000_000,
    }
    .encode()
}

/// Config with tiny segments so rolls happen constantly.
pub fn small_cfg(data_dir: &Path) -> WalConfig {
    let mut cfg = WalConfig::new(data_dir);
    cfg.segment_bytes = 1024;
    cfg.min_free_bytes = 0;
    cfg
}

pub fn open_std(cfg: &WalConfig, committed: u64) -> (Wal, sluice::wal::RecoveryReport) {
    Wal::open(
        cfg.clone(),
        Arc::new(StdFs) as Arc<dyn Filesystem>,
        committed,
    )
    .expect("open")
}

/// Everything readable now: (seq, value) pairs and gaps.
pub fn read_all(wal: &Wal, from: u64) -> (Vec<(u64, String)>, Vec<sluice::wal::Gap>) {
    let mut reader = wal.reader(from);
    let (mut recs, mut gaps) = (Vec::new(), Vec::new());
    while let Some(item) = reader.try_next().expect("read") {
        match item {
            ReadItem::Record { seq, record, .. } => {
                recs.push((seq, String::from_utf8(record.value).unwrap()))
            }
            ReadItem::Gap(g) => gaps.push(g),
        }
    }
    (recs, gaps)
}

/// Segment file names in `dir/wal`, sorted.
pub fn segment_files(data_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}
