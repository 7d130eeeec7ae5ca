//! Bodies of the cargo-fuzz targets. They live in the library so that the
//! regular test suite replays the seed corpus through the very same code
//! (`tests/wal/fuzz_seeds.rs`); `fuzz/` only wraps them.

use std::path::Path;
use std::sync::Arc;

use crate::wal::format::{self, encode_frame};
use crate::wal::io::{Filesystem, SimFs};
use crate::wal::{inspect, ReadItem, Record, Wal, WalConfig};

/// Arbitrary bytes as a segment file: open (recovery), iterate and verify
/// must not panic or allocate without bound, and recovery must leave a log
/// that reads contiguously and accepts appends. The first byte picks how the
/// rest is used, so the fuzzer reaches past the header and frame checksums:
/// 0 = the whole file, 1 = a valid header then raw bytes, 2 = a valid header
/// then frames with valid checksums built from length-prefixed chunks; the
/// header is of the current version, or of version 1 when `mode / 3` is odd.
pub fn wal_segment(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let version = if (mode / 3) % 2 == 1 {
        format::MIN_READ_VERSION
    } else {
        format::VERSION
    };
    let header = format::encode_header_version(1, version);
    let file = match mode % 3 {
        0 => rest.to_vec(),
        1 => [&header[..], rest].concat(),
        _ => {
            let mut file = header.to_vec();
            let (mut seq, mut i) = (1u64, 0usize);
            while i < rest.len() {
                let ctl = rest[i];
                let len = (ctl & 0x7f) as usize;
                let payload = &rest[(i + 1).min(rest.len())..(i + 1 + len).min(rest.len())];
                i += 1 + len;
                if ctl & 0x80 != 0 {
                    seq += 2; // a sequence jump
                }
                if !payload.is_empty() {
                    encode_frame(&mut file, seq, payload);
                    seq += 1;
                }
            }
            file
        }
    };
    let fs = SimFs::new();
    let data_dir = Path::new("/fuzz");
    let wal_dir = crate::datadir::wal_dir(data_dir);
    fs.write_file(&wal_dir.join(format::segment_name(1)), &file);
    let _ = inspect::verify(&fs, &wal_dir, 0);
    let mut cfg = WalConfig::new(data_dir);
    cfg.min_free_bytes = 0;
    let fs: Arc<dyn Filesystem> = Arc::new(fs);
    let Ok((wal, report)) = Wal::open(cfg, fs, 0) else {
        return;
    };
    let mut reader = wal.reader(1);
    let mut expect = 1;
    while let Ok(Some(item)) = reader.try_next() {
        let (first, last) = match item {
            ReadItem::Record { seq, .. } => (seq, seq),
            ReadItem::Gap(g) => (g.first, g.last),
        };
        assert_eq!(first, expect, "reader skipped or repeated sequence numbers");
        expect = last + 1;
    }
    assert_eq!(
        expect, report.next_seq,
        "recovery and replay disagree on the end"
    );
    let record = Record {
        stream: crate::wal::DEFAULT_STREAM.to_string(),
        key: None,
        value: b"{}".to_vec(),
        headers: Vec::new(),
        timestamp_ms: 0,
    };
    let range = wal
        .append_blocking(vec![record.encode()])
        .expect("a recovered log accepts appends");
    assert_eq!(range.first, report.next_seq);
}

/// Arbitrary bytes as a frame and as a record payload: no panic, bounded
/// allocation, and whatever decodes re-encodes to the same bytes.
pub fn wal_record(data: &[u8]) {
    if let Ok(frame) = format::decode_frame(data) {
        let mut again = Vec::new();
        encode_frame(&mut again, frame.seq, frame.payload);
        assert_eq!(&again[..], &data[..frame.disk_len()]);
    }
    if let Ok(record) = Record::decode(data) {
        // A v2 payload re-encodes to itself; a v1 one (default stream) to
        // the v2 payload of the same record.
        let again = record.encode();
        if data.first() == Some(&2) {
            assert_eq!(again, data);
        } else {
            assert_eq!(record.stream, crate::wal::DEFAULT_STREAM);
        }
        assert_eq!(Record::decode(&again).ok(), Some(record));
    }
}

/// Arbitrary bytes as a request body in each format, through parsing and
/// normalization with small limits: no panic, and every accepted event
/// respects the limits and decodes as a record.
pub fn ingest_body(data: &[u8]) {
    use crate::ingest::config::{EventsConfig, Limits};
    use crate::ingest::{prepare, BodyFormat, Normalizer};
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let format = match mode % 3 {
        0 => BodyFormat::Json,
        1 => BodyFormat::Ndjson,
        _ => BodyFormat::Csv,
    };
    // mode / 3: 0 plain, 1 gzip, 2 zstd, as the handler decodes them.
    let coding = match (mode / 3) % 3 {
        0 => None,
        1 => Some(crate::ingest::decode::Coding::Gzip),
        _ => Some(crate::ingest::decode::Coding::Zstd),
    };
    // The daemon's default body limit (10 MiB after decompression), so a
    // small compressed input can still reach the parser with a body whose
    // shape, not its size, is what costs memory (fuzz with -malloc_limit_mb).
    const MAX_BODY: usize = 10 << 20;
    let decoded;
    let body = match coding {
        None => body,
        Some(c) => {
            match crate::ingest::decode::decode_body(body.to_vec(), &[c], MAX_BODY as u64, |_| true)
            {
                Ok(b) => {
                    assert!(b.len() <= MAX_BODY);
                    decoded = b;
                    &decoded[..]
                }
                Err(_) => return,
            }
        }
    };
    let limits = Limits {
        max_events_per_request: 100,
        max_event_bytes: 4096,
        max_depth: 16,
        ..Limits::default()
    };
    let normalizer = Normalizer::new(limits.clone(), EventsConfig::default());
    let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("valid");
    if let Ok(batch) = prepare(
        format,
        body,
        &limits,
        &normalizer,
        now,
        &crate::auth::TenantScope::Any,
    ) {
        assert!(batch.accepted.len() + batch.rejected.len() <= limits.max_events_per_request);
        for e in &batch.accepted {
            let r = Record::decode(&e.payload).expect("accepted events decode");
            assert!(r.value.len() <= limits.max_event_bytes);
        }
    }
}

/// Arbitrary bytes as an OTLP logs body through the whole conversion. The
/// first byte picks the encoding (even: protobuf, odd: OTLP/JSON) and
/// whether the rest is gzipped (bit 1), as the handler decodes it. Within
/// the limits: no panic, no more records than allowed, every accepted event
/// a record whose value fits the event limit and carries its metadata.
pub fn otlp_logs(data: &[u8]) {
    use crate::ingest::config::{EventsConfig, Limits};
    use crate::ingest::otlp::{prepare, Encoding, OtlpConfig};
    use crate::ingest::Normalizer;
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let encoding = if mode & 1 == 0 {
        Encoding::Protobuf
    } else {
        Encoding::Json
    };
    const MAX_BODY: usize = 10 << 20;
    let decoded;
    let body = if mode & 2 == 0 {
        body
    } else {
        let gzip = crate::ingest::decode::Coding::Gzip;
        match crate::ingest::decode::decode_body(body.to_vec(), &[gzip], MAX_BODY as u64, |_| true)
        {
            Ok(b) => {
                decoded = b;
                &decoded[..]
            }
            Err(_) => return,
        }
    };
    let limits = Limits {
        max_events_per_request: 100,
        max_event_bytes: 4096,
        max_depth: 16,
        ..Limits::default()
    };
    // Tenant and source optional, so records reach the metadata mapping.
    let events = EventsConfig {
        required: vec!["message".into()],
        ..EventsConfig::default()
    };
    if encoding == Encoding::Protobuf {
        otlp_json_differential(body, &limits);
    }
    let normalizer = Normalizer::new(limits.clone(), events);
    let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("valid");
    let Ok(batch) = prepare(
        encoding,
        body,
        &limits,
        &normalizer,
        &OtlpConfig::default(),
        now,
        &crate::auth::TenantScope::Any,
    ) else {
        return;
    };
    assert!(batch.accepted.len() + batch.rejected.len() <= limits.max_events_per_request);
    for e in &batch.accepted {
        let r = Record::decode(&e.payload).expect("accepted events decode");
        assert!(r.value.len() <= limits.max_event_bytes);
        let v: serde_json::Value = serde_json::from_slice(&r.value).expect("values are JSON");
        assert!(v["metadata"].is_object(), "{v}");
    }
}

/// A protobuf body that decodes, written as OTLP/JSON by
/// opentelemetry-proto's own serde, must read back as the same message
/// through sluice's OTLP/JSON reader. Skipped: requests holding a
/// non-finite double (serde_json writes it as null, OTLP/JSON by name).
/// Allowed to fail only where JSON is the stricter: serde_json's nesting
/// limit (128, against prost's 100 messages) and the object budget (the
/// JSON text has one object more: the request itself).
fn otlp_json_differential(body: &[u8], limits: &crate::ingest::config::Limits) {
    use crate::ingest::otlp::{decode, Encoding, OtlpError};
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
    fn finite(kvs: &[KeyValue]) -> bool {
        kvs.iter()
            .all(|kv| kv.value.as_ref().is_none_or(finite_value))
    }
    fn finite_value(v: &AnyValue) -> bool {
        match &v.value {
            Some(Value::DoubleValue(d)) => d.is_finite(),
            Some(Value::ArrayValue(a)) => a.values.iter().all(finite_value),
            Some(Value::KvlistValue(l)) => finite(&l.values),
            _ => true,
        }
    }
    let Ok(request) = decode(Encoding::Protobuf, body, limits) else {
        return;
    };
    let all_finite = request.resource_logs.iter().all(|r| {
        r.resource.as_ref().is_none_or(|r| finite(&r.attributes))
            && r.scope_logs.iter().all(|s| {
                s.scope.as_ref().is_none_or(|s| finite(&s.attributes))
                    && s.log_records
                        .iter()
                        .all(|l| finite(&l.attributes) && l.body.as_ref().is_none_or(finite_value))
            })
    });
    if !all_finite {
        return;
    }
    let Ok(json) = serde_json::to_vec(&request) else {
        return;
    };
    match decode(Encoding::Json, &json, limits) {
        Ok(back) => assert!(back == request, "OTLP/JSON read back differs"),
        Err(OtlpError::TooManyMessages(_)) => {}
        Err(e) => assert!(e.to_string().contains("recursion limit"), "{e}"),
    }
}

/// Arbitrary bytes as a config file: parsing, validation and the error
/// locator must not panic.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::config::Config::from_toml(text) {
        Ok(c) => {
            if let Err(e) = c.validate() {
                let msg = e.to_string();
                if let Some(key) = crate::config::key_in(&msg) {
                    let _ = crate::config::locate(text, key);
                }
            }
        }
        Err(msg) => {
            let _ = crate::config::key_in(&msg);
        }
    }
}
