//! CPU cost of the hot path without I/O: frame encode/decode, record
//! encode/decode, and parsing + normalizing a request body in each format
//! (JSON single, JSON batch, NDJSON, CSV). Run with `make bench`.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::auth::TenantScope;
use sluice::config::{EventsConfig, Limits};
use sluice::ingest::{prepare, BodyFormat, Normalizer};
use sluice::wal::format::{decode_frame, encode_frame};
use sluice::wal::Record;

fn record() -> Record {
    Record {
        stream: sluice::wal::DEFAULT_STREAM.to_string(),
        key: Some(b"acme".to_vec()),
        value: br#"{"id":"0190c0de-0000-7000-8000-000000000000","tenant_id":"acme","timestamp":"2026-11-24T10:00:00.000Z","severity":"INFO","source":"web","message":"GET /index.html 200 1532 bytes in 3 ms from 10.1.2.3 user-agent curl/8.0"}"#.to_vec(),
        headers: vec![
            ("id".into(), b"0190c0de-0000-7000-8000-000000000000".to_vec()),
            ("tenant".into(), b"acme".to_vec()),
            ("received_at".into(), b"2026-11-24T10:00:00.000Z".to_vec()),
        ],
        timestamp_ms: 1_700_000_000_000,
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    let r = record();
    let payload = r.encode();
    g.bench_function("record_encode", |b| b.iter(|| r.encode()));
    g.bench_function("record_decode", |b| {
        b.iter(|| Record::decode(&payload).unwrap())
    });
    let mut frame = Vec::new();
    encode_frame(&mut frame, 42, &payload);
    g.bench_function("frame_encode", |b| {
        let mut out = Vec::with_capacity(frame.len());
        b.iter(|| {
            out.clear();
            encode_frame(&mut out, 42, &payload);
        })
    });
    g.bench_function("frame_decode", |b| b.iter(|| decode_frame(&frame).unwrap()));
    g.finish();
}

fn event(i: usize) -> serde_json::Value {
    serde_json::json!({
        "tenant_id": "acme", "source": "Web ", "severity": "warning",
        "timestamp": "2026-11-24T10:00:00+01:00",
        "message": format!("GET /index.html 200 1532 bytes in 3 ms from 10.1.2.{i}"),
        "http": {"status": 200, "path": "/index.html"}
    })
}

fn bodies(n: usize) -> Vec<(&'static str, BodyFormat, Vec<u8>)> {
    let events: Vec<_> = (0..n).map(event).collect();
    let ndjson: String = events.iter().map(|e| format!("{e}\n")).collect();
    let mut csv = String::from("tenant_id,source,severity,timestamp,message\n");
    for i in 0..n {
        csv.push_str(&format!(
            "acme,Web ,warning,2026-11-24T10:00:00+01:00,GET /index.html 200 1532 bytes in 3 ms from 10.1.2.{i}\n"
        ));
    }
    vec![
        (
            "json",
            BodyFormat::Json,
            serde_json::Value::Array(events).to_string().into_bytes(),
        ),
        ("ndjson", BodyFormat::Ndjson, ndjson.into_bytes()),
        ("csv", BodyFormat::Csv, csv.into_bytes()),
    ]
}

fn parse(c: &mut Criterion) {
    let limits = Limits::default();
    let normalizer = Normalizer::new(limits.clone(), EventsConfig::default());
    let now = chrono::Utc::now();
    let mut g = c.benchmark_group("parse_normalize");
    let single = event(0).to_string().into_bytes();
    g.throughput(Throughput::Elements(1));
    g.bench_function("json_single", |b| {
        b.iter(|| {
            prepare(
                BodyFormat::Json,
                &single,
                &limits,
                &normalizer,
                now,
                &TenantScope::Any,
            )
            .unwrap()
        })
    });
    for (name, format, body) in bodies(1000) {
        g.throughput(Throughput::Elements(1000));
        g.bench_with_input(BenchmarkId::new(name, 1000), &body, |b, body| {
            b.iter(|| {
                let batch =
                    prepare(format, body, &limits, &normalizer, now, &TenantScope::Any).unwrap();
                assert_eq!(batch.accepted.len(), 1000);
                batch
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, parse);
criterion_main!(benches);
