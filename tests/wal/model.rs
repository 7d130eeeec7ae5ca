//! Model check: random appends (with rolls every few records), GC, injected
//! write and fsync failures, restarts without a crash (the page cache still
//! holds what a failed fsync dropped), and crashes that tear unsynced bytes at
//! any point, against an in-memory model of what was acknowledged.
//!
//! After every crash and reopen:
//! - every acknowledged record above the committed offset is read back intact;
//! - sequence numbers read are contiguous from the committed offset;
//! - anything read past the last acknowledged record is a prefix of what was
//!   written but not acknowledged (nothing after a torn frame comes back).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use sluice::wal::io::{Fault, FaultKind, Filesystem, SimFs};
use sluice::wal::{ReadItem, Wal, WalConfig, WalError};

use super::rec;

#[derive(Debug, Clone)]
enum Op {
    /// Record sizes of one append request.
    Append(Vec<usize>),
    /// Commit up to a fraction (per mille) of the acknowledged range, then GC.
    Gc(u16),
    FailSync,
    /// A write that stores this many bytes, then fails with ENOSPC.
    FailWrite(u16),
    /// Power loss; the number picks how much of the unsynced tail survives.
    Crash(u32),
    /// The process exits and starts again; the machine keeps running, so the
    /// page cache (with whatever a failed fsync left in it) stays.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec(1usize..120, 1..6).prop_map(Op::Append),
        1 => (0u16..=1000).prop_map(Op::Gc),
        1 => Just(Op::FailSync),
        1 => any::<u16>().prop_map(Op::FailWrite),
        2 => any::<u32>().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    fs: SimFs,
    cfg: WalConfig,
    wal: Option<Wal>,
    /// Durable and acknowledged (or recovered, which makes them durable).
    acked: BTreeMap<u64, String>,
    /// Written by a failed append: may or may not come back.
    unacked: BTreeMap<u64, String>,
    committed: u64,
    next_seq: u64,
    failed: bool,
    counter: u64,
}

impl Model {
    fn new() -> Self {
        let mut cfg = WalConfig::new(Path::new("/data"));
        cfg.segment_bytes = 400;
        cfg.min_free_bytes = 0;
        let fs = SimFs::new();
        let mut m = Model {
            fs,
            cfg,
            wal: None,
            acked: BTreeMap::new(),
            unacked: BTreeMap::new(),
            committed: 0,
            next_seq: 1,
            failed: false,
            counter: 0,
        };
        m.reopen();
        m
    }

    fn wal(&self) -> &Wal {
        self.wal.as_ref().expect("open")
    }

    fn reopen(&mut self) {
        let fs: Arc<dyn Filesystem> = Arc::new(self.fs.clone());
        let (wal, report) = Wal::open(self.cfg.clone(), fs, self.committed).expect("recovery");
        assert!(report.lost.is_empty(), "no acknowledged loss: {report:?}");
        let mut reader = wal.reader(self.committed + 1);
        let mut expect_seq = self.committed + 1;
        let mut read = BTreeMap::new();
        while let Some(item) = reader.try_next().expect("read") {
            match item {
                ReadItem::Record { seq, record, .. } => {
                    assert_eq!(seq, expect_seq, "contiguous");
                    expect_seq += 1;
                    read.insert(seq, String::from_utf8(record.value).unwrap());
                }
                ReadItem::Gap(g) => panic!("unexpected gap {g:?}"),
            }
        }
        for (seq, tag) in self.acked.range(self.committed + 1..) {
            assert_eq!(read.get(seq), Some(tag), "acknowledged seq {seq} lost");
        }
        let last_acked = self.acked.keys().next_back().copied().unwrap_or(0);
        for (seq, tag) in read.range(last_acked + 1..) {
            assert_eq!(
                self.unacked.get(seq),
                Some(tag),
                "seq {seq} was never written"
            );
        }
        assert_eq!(report.next_seq, expect_seq.max(self.committed + 1));
        self.next_seq = report.next_seq;
        self.acked.extend(read);
        self.unacked.clear();
        self.failed = false;
        self.wal = Some(wal);
    }

    fn append(&mut self, sizes: &[usize]) -> Result<(), WalError> {
        let tags: Vec<String> = sizes
            .iter()
            .map(|&n| {
                self.counter += 1;
                format!("{}:{}", self.counter, "x".repeat(n))
            })
            .collect();
        let result = self
            .wal()
            .append_blocking(tags.iter().map(|t| rec(t)).collect());
        match &result {
            Ok(range) => {
                assert!(!self.failed, "a failed WAL acknowledged an append");
                assert_eq!(range.first, self.next_seq);
                for (i, t) in tags.into_iter().enumerate() {
                    self.acked.insert(range.first + i as u64, t);
                }
                self.next_seq = range.last + 1;
            }
            Err(WalError::Failed(_)) => assert!(self.failed),
            Err(_) => {
                for (i, t) in tags.into_iter().enumerate() {
                    self.unacked.insert(self.next_seq + i as u64, t);
                }
                self.failed = true;
            }
        }
        result.map(drop)
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Append(sizes) => {
                let _ = self.append(sizes);
            }
            Op::Gc(per_mille) => {
                let last = self.acked.keys().next_back().copied().unwrap_or(0);
                let target = self.committed
                    + (last.saturating_sub(self.committed)) * u64::from(*per_mille) / 1000;
                // The offset is durable before GC (here, the model's own).
                self.committed = target;
                self.wal().remove_through(target).expect("gc");
            }
            Op::FailSync => {
                self.fs.inject(Fault::Sync(FaultKind::Io));
                assert!(self.append(&[10]).is_err());
            }
            Op::FailWrite(n) => {
                self.fs.inject(Fault::Write {
                    written: *n as usize % 200,
                    kind: FaultKind::NoSpace,
                });
                assert!(self.append(&[50, 50]).is_err());
            }
            Op::Reopen => {
                self.wal = None;
                self.fs.clear_faults();
                self.reopen();
            }
            Op::Crash(seed) => {
                self.wal = None;
                let mut seed = *seed as usize;
                self.fs.crash(|_, extra| {
                    seed = seed.wrapping_mul(31).wrapping_add(7);
                    seed % (extra + 1)
                });
                self.reopen();
            }
        }
    }
}

/// A roll whose directory fsync fails leaves a segment name that is not
/// durable. A restart without a crash still sees it; an append acknowledged
/// after that restart must survive the next power loss.
#[test]
fn an_append_after_a_failed_roll_and_a_restart_survives_a_crash() {
    let mut m = Model::new();
    // Fill the first segment so that the next append rolls.
    m.append(&[60]).expect("append");
    while m.wal().durable().borrow().active_len + 2 * 150 <= m.cfg.segment_bytes {
        m.append(&[60]).expect("append");
    }
    let segments = m.wal().stats().segments;
    m.fs.inject(Fault::SyncDir(FaultKind::Io));
    assert!(
        m.append(&[60, 60]).is_err(),
        "the roll's directory fsync failed"
    );
    assert_eq!(
        m.wal().stats().segments,
        segments,
        "the roll did not finish"
    );
    m.apply(&Op::Reopen);
    m.append(&[10]).expect("acknowledged after the restart");
    m.apply(&Op::Crash(0));
}

/// After a failed fdatasync and a restart without a crash, the page cache
/// still shows the unsynced frames. New acknowledged appends must not land
/// behind them (a later sync would write them past a hole).
#[test]
fn an_append_after_a_failed_fsync_and_a_restart_survives_a_crash() {
    let mut m = Model::new();
    m.append(&[10]).expect("append");
    m.apply(&Op::FailSync);
    m.apply(&Op::Reopen);
    m.append(&[10]).expect("acknowledged after the restart");
    m.apply(&Op::Crash(0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_records_survive_any_crash(ops in prop::collection::vec(op(), 1..60)) {
        let mut m = Model::new();
        for op in &ops {
            m.apply(op);
        }
        m.apply(&Op::Crash(0));
    }
}
