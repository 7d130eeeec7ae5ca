//! WAL append throughput under group commit, against the disk's own
//! fdatasync rate measured in the same run (a write + fdatasync loop on the
//! same filesystem). Run with `make bench`.
//!
//! Besides criterion's time per iteration, each concurrency level prints
//! records/s, fsyncs/s and records per fsync from the WAL's own counters.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::wal::io::{Filesystem, StdFs};
use sluice::wal::{Record, Wal, WalConfig};

/// A record whose encoded payload is 256 bytes.
fn payload_256() -> Vec<u8> {
    let mut r = Record {
        stream: sluice::wal::DEFAULT_STREAM.to_string(),
        key: Some(b"tenant-a".to_vec()),
        value: Vec::new(),
        headers: vec![(
            "id".into(),
            b"0190c0de-0000-7000-8000-000000000000".to_vec(),
        )],
        timestamp_ms: 1_700_000_000_000,
    };
    let overhead = r.encode().len();
    r.value = vec![b'x'; 256 - overhead];
    let p = r.encode();
    assert_eq!(p.len(), 256);
    p
}

fn bench_dir() -> tempfile::TempDir {
    // The target directory sits on the same filesystem as a typical data dir.
    std::fs::create_dir_all("target/bench-wal").unwrap();
    tempfile::tempdir_in("target/bench-wal").unwrap()
}

fn fdatasync_probe(c: &mut Criterion) {
    let dir = bench_dir();
    let f = std::fs::File::create(dir.path().join("probe")).unwrap();
    let block = vec![7u8; 256];
    let mut off = 0u64;
    let mut g = c.benchmark_group("disk");
    g.throughput(Throughput::Elements(1));
    g.bench_function("write_256B_fdatasync", |b| {
        b.iter(|| {
            f.write_all_at(&block, off).unwrap();
            f.sync_data().unwrap();
            off += 256;
        })
    });
    g.finish();
}

fn append_concurrent(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = payload_256();
    let mut g = c.benchmark_group("wal_append_256B");
    g.measurement_time(Duration::from_secs(8));
    for appenders in [1usize, 16, 256] {
        let dir = bench_dir();
        let mut cfg = WalConfig::new(dir.path());
        cfg.min_free_bytes = 0;
        cfg.max_bytes = u64::MAX;
        let wal = Arc::new(
            Wal::open(cfg, Arc::new(StdFs) as Arc<dyn Filesystem>, 0)
                .unwrap()
                .0,
        );
        // One iteration = every appender appends one record, concurrently.
        g.throughput(Throughput::Elements(appenders as u64));
        let (mut records, mut fsyncs, mut elapsed) = (0u64, 0u64, Duration::ZERO);
        g.bench_with_input(
            BenchmarkId::from_parameter(appenders),
            &appenders,
            |b, &n| {
                b.iter_custom(|iters| {
                    let before = wal.counters().fsyncs.load(Ordering::Relaxed);
                    let start = Instant::now();
                    rt.block_on(async {
                        let tasks: Vec<_> = (0..n)
                            .map(|_| {
                                let (wal, p) = (wal.clone(), payload.clone());
                                tokio::spawn(async move {
                                    for _ in 0..iters {
                                        wal.append(vec![p.clone()]).await.unwrap();
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                    let took = start.elapsed();
                    records += iters * n as u64;
                    fsyncs += wal.counters().fsyncs.load(Ordering::Relaxed) - before;
                    elapsed += took;
                    took
                })
            },
        );
        let secs = elapsed.as_secs_f64();
        let line = format!(
            "appenders={appenders:>3}  records/s={:>10.0}  fsyncs/s={:>8.0}  records/fsync={:>7.1}\n",
            records as f64 / secs,
            fsyncs as f64 / secs,
            records as f64 / fsyncs.max(1) as f64
        );
        eprint!("{line}");
        let mut summary = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("target/bench-wal/summary.txt")
            .unwrap();
        summary.write_all(line.as_bytes()).unwrap();
    }
    g.finish();
}

criterion_group!(benches, fdatasync_probe, append_concurrent);
criterion_main!(benches);
