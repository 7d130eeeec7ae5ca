//! The Kafka producer: its configuration, the size an event may have to fit
//! a record, error classification, connectivity, and every Kafka header name
//! sluice writes. The one place the `kafka` feature gates: without it (the
//! fuzz targets) only the config checks that need no librdkafka remain.

#[cfg(feature = "kafka")]
use std::sync::Arc;

#[cfg(feature = "kafka")]
use rdkafka::client::ClientContext;
#[cfg(feature = "kafka")]
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
#[cfg(feature = "kafka")]
use rdkafka::ClientConfig;

use super::config::KafkaConfig;
#[cfg(feature = "kafka")]
use super::ReplayStats;

/// Kafka header names. Ingest stores the first three in the WAL record;
/// replay adds `seq` and `instance` at produce time and the last two on a
/// dead letter; `sluice wal redrive` adds the `origin-*` pair. Which headers
/// leave sluice is decided in one place: [`super::headers::Ours`].
pub use crate::ingest::{HEADER_ID, HEADER_RECEIVED_AT, HEADER_TENANT};
pub const HEADER_SEQ: &str = "seq";
/// The data directory's stable id (`crate::instance`), next to `seq`: the
/// consumer rule deduplicates per (instance, partition).
pub const HEADER_INSTANCE: &str = "instance";
/// On a re-sent record (`sluice wal redrive`), the instance and seq it was
/// first sent under; `instance` and `seq` are then the redrive run's own.
pub const HEADER_ORIGIN_INSTANCE: &str = "origin-instance";
pub const HEADER_ORIGIN_SEQ: &str = "origin-seq";
pub const HEADER_ERROR: &str = "error";
pub const HEADER_ORIGINAL_TOPIC: &str = "original_topic";

/// What bounds an event's key and headers, from the ingest limits.
#[derive(Debug, Clone, Copy)]
pub struct EventBounds<'a> {
    pub max_id_chars: usize,
    pub max_source_chars: usize,
    /// The event field used as the Kafka key.
    pub key_field: &'a str,
}

/// Properties sluice sets itself because its guarantees depend on them.
/// The timeout and the gapless guarantee are what keep first occurrences in
/// `seq` order per partition (see replayer.rs).
const RESERVED: [&str; 6] = [
    "acks",
    "enable.idempotence",
    "bootstrap.servers",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "enable.gapless.guarantee",
];

/// librdkafka's default `message.max.bytes`, used when the config does not
/// pass one through.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// librdkafka's per-record overhead in its size check
/// (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: length, attributes, timestamp and
/// offset deltas, key and value lengths, header count, all as widest varints).
const RECORD_OVERHEAD: usize = 36;

/// Bytes of the `error` header on a dead-letter record, at most (longer
/// error texts are cut), so that a record that fits its topic fits the
/// dead-letter topic too.
pub const ERROR_HEADER_MAX: usize = 512;

/// Bytes of a received-at timestamp (RFC 3339 with milliseconds) and of a
/// decimal u64, with room to spare.
const TIMESTAMP_MAX: usize = 40;
const SEQ_MAX: usize = 20;

/// The largest event value (bytes of normalized JSON) whose whole Kafka
/// record, key and headers included, the producer's `message.max.bytes`
/// still takes, in the topic and in the dead-letter topic. librdkafka refuses
/// a larger record at produce time with MSG_SIZE_TOO_LARGE, which would send
/// an event that already got its 202 to the dead letters.
pub fn value_fit(k: &KafkaConfig, limits: &EventBounds) -> Result<usize, String> {
    let max = match k.librdkafka.get("message.max.bytes") {
        None => LIBRDKAFKA_MESSAGE_MAX_BYTES,
        Some(v) => v
            .parse()
            .map_err(|_| "kafka.librdkafka.message.max.bytes is not a number".to_string())?,
    };
    // librdkafka's header size: per header a varint key length (<= 5), the
    // key, a varint value length (<= 5), the value. Every header a record
    // can carry must be counted here, or its events get 202 and then a dead
    // letter.
    let header = |name: &str, value: usize| 10 + name.len() + value;
    let utf8_max = |chars: usize| chars * 4;
    // A record leaves with the dead-letter pair (replay's dead-letter
    // topic) or the origin pair (redrive), never both; `:sluice.` headers
    // never leave (see `headers::Ours`).
    let dead_letter =
        header(HEADER_ERROR, ERROR_HEADER_MAX) + header(HEADER_ORIGINAL_TOPIC, k.topic.len());
    let origin = header(HEADER_ORIGIN_INSTANCE, crate::instance::ID_LEN)
        + header(HEADER_ORIGIN_SEQ, SEQ_MAX);
    let headers = header(HEADER_ID, utf8_max(limits.max_id_chars))
        + header(HEADER_TENANT, 64)
        + header(HEADER_RECEIVED_AT, TIMESTAMP_MAX)
        + header(HEADER_SEQ, SEQ_MAX)
        + header(HEADER_INSTANCE, crate::instance::ID_LEN)
        + dead_letter.max(origin);
    // The key is one of the event's fields. Known fields have a bound of
    // their own; any other field is part of the value, so at most its size.
    let key = match limits.key_field {
        "tenant_id" => Some(64),
        "id" => Some(utf8_max(limits.max_id_chars)),
        "source" => Some(utf8_max(limits.max_source_chars)),
        "timestamp" => Some(TIMESTAMP_MAX),
        "severity" => Some(8),
        _ => None,
    };
    let room = max.checked_sub(RECORD_OVERHEAD + headers + key.unwrap_or(0));
    let fit = match (room, key) {
        (Some(room), Some(_)) => room,
        (Some(room), None) => room / 2,
        (None, _) => 0,
    };
    if fit < 1024 {
        return Err(format!(
            "kafka.librdkafka.message.max.bytes ({max}) leaves {fit} bytes for an event after the key and headers; at least 1024 are needed"
        ));
    }
    Ok(fit)
}

/// The checks of `[kafka]` alone (see [`KafkaConfig::validate`]).
pub fn validate(k: &KafkaConfig) -> Result<(), String> {
    let bad = |m: String| Err(m);
    if k.topic.is_empty() || k.dead_letter_topic.is_empty() {
        return bad("kafka.topic and kafka.dead-letter-topic must be set".into());
    }
    if k.topic == k.dead_letter_topic {
        return bad("kafka.dead-letter-topic must differ from kafka.topic".into());
    }
    if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&k.compression.as_str()) {
        return bad(format!(
            "kafka.compression {:?} is not one of none, gzip, snappy, lz4, zstd",
            k.compression
        ));
    }
    if k.dev_partitions < 1 {
        return bad("kafka.dev-partitions must be at least 1".into());
    }
    for key in k.librdkafka.keys() {
        if RESERVED.contains(&key.as_str()) {
            return bad(format!(
                "kafka.librdkafka.{key}: cannot be set, sluice relies on its own value"
            ));
        }
    }
    // librdkafka itself rejects unknown properties and bad values; each is
    // tried alone first, so the error names the property (and check-config
    // its line).
    #[cfg(feature = "kafka")]
    for (key, value) in &k.librdkafka {
        ClientConfig::new()
            .set(key, value)
            .create_native_config()
            .map_err(|e| format!("kafka.librdkafka.{key}: {e}"))?;
    }
    #[cfg(feature = "kafka")]
    producer_config(k, "localhost:9092")
        .create_native_config()
        .map_err(|e| format!("kafka.librdkafka: {e}"))?;
    Ok(())
}

#[cfg(feature = "kafka")]
/// The producer configuration: sluice's fixed guarantees, the configured
/// tunables, then the passthrough properties.
pub fn producer_config(k: &KafkaConfig, brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", &k.compression)
        .set("linger.ms", k.linger_ms.to_string())
        .set("batch.size", k.batch_size.to_string())
        // A record librdkafka gives up on by timeout lets later records of
        // its partition through (its gapless guarantee excludes timeouts),
        // and producing it again would put its first occurrence behind
        // theirs. So librdkafka never times out; replay's own stall check
        // (kafka.message-timeout-ms) drops the whole producer instead.
        .set("message.timeout.ms", "0")
        // A refused batch stops the producer (fatal) instead of letting the
        // partition's later batches through with a new epoch.
        .set("enable.gapless.guarantee", "true")
        // Room for the replayer's in-flight bound; the bound is ours.
        .set("queue.buffering.max.messages", "1000000");
    for (key, value) in &k.librdkafka {
        c.set(key, value);
    }
    c
}

#[cfg(feature = "kafka")]
/// What to do with a record whose delivery failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Kafka will never take this record: dead-letter it.
    Permanent,
    /// Anything else (timeouts, broker errors): produce again from the
    /// committed offset after a backoff.
    Retriable,
}

#[cfg(feature = "kafka")]
/// Classifies a delivery or enqueue error. Only errors that are about the
/// record itself are permanent; everything else is retried forever.
pub fn classify(e: &KafkaError) -> Failure {
    let code = match e {
        KafkaError::MessageProduction(code) => *code,
        _ => return Failure::Retriable,
    };
    // Explicit paths, not a glob import: a misspelled variant under a glob
    // silently becomes a catch-all binding.
    match code {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::InvalidMessage
        | RDKafkaErrorCode::InvalidRecord
        | RDKafkaErrorCode::PolicyViolation
        | RDKafkaErrorCode::InvalidTimestamp
        | RDKafkaErrorCode::BadMessage => Failure::Permanent,
        _ => Failure::Retriable,
    }
}

#[cfg(feature = "kafka")]
/// librdkafka client context: turns global errors into the connectivity
/// state and logs them once per change.
#[derive(Clone)]
pub struct KafkaHealth(pub Arc<ReplayStats>);

#[cfg(feature = "kafka")]
impl ClientContext for KafkaHealth {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => self.0.set_connected(false, reason),
            Some(code @ (RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) => {
                self.0.client_error(&format!("{code:?}: {reason}"));
                tracing::debug!(%error, reason, "librdkafka error");
            }
            _ => tracing::debug!(%error, reason, "librdkafka error"),
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => tracing::error!(fac, message, "librdkafka"),
            Warning => tracing::debug!(fac, message, "librdkafka"),
            _ => tracing::trace!(fac, message, "librdkafka"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::headers::Ours;

    /// A record at `value_fit` with every header at its largest fits
    /// `message.max.bytes` on every path, counted from what
    /// `headers::Ours` actually sends (an internal header of any size
    /// included, since it never leaves).
    #[test]
    fn value_fit_counts_every_header_that_leaves_on_every_path() {
        let k = KafkaConfig::default();
        let bounds = EventBounds {
            max_id_chars: 256,
            max_source_chars: 256,
            key_field: "tenant_id",
        };
        let fit = value_fit(&k, &bounds).unwrap();
        let own: Vec<(String, Vec<u8>)> = vec![
            (HEADER_ID.into(), vec![b'i'; 4 * bounds.max_id_chars]),
            (HEADER_TENANT.into(), vec![b't'; 64]),
            (HEADER_RECEIVED_AT.into(), vec![b'r'; TIMESTAMP_MAX]),
            (":sluice.idempotency".into(), vec![b'x'; 64 * 1024]),
        ];
        let instance = "0".repeat(crate::instance::ID_LEN);
        let error = [b'e'; ERROR_HEADER_MAX];
        let extra: [(&str, &[u8]); 2] = [
            (HEADER_ERROR, &error),
            (HEADER_ORIGINAL_TOPIC, k.topic.as_bytes()),
        ];
        let paths = [
            Ours::new(u64::MAX, Some(&instance)),
            Ours::new(u64::MAX, Some(&instance)).extra(&extra),
            Ours::new(u64::MAX, Some(&instance)).origin(Some(&instance), u64::MAX),
        ];
        for ours in &paths {
            let headers: usize = ours.pairs(&own).map(|(k, v)| 10 + k.len() + v.len()).sum();
            let record = RECORD_OVERHEAD + 64 + fit + headers;
            assert!(
                record <= LIBRDKAFKA_MESSAGE_MAX_BYTES,
                "{record} bytes with {ours:?}"
            );
        }
    }
}
