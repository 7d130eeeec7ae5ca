//! Kafka: the producer settings, the replayer that streams the WAL into
//! Kafka, dead letters, and the embedded development broker.

#[cfg(feature = "kafka")]
pub mod consume;
pub mod dead_letter;
#[cfg(feature = "kafka")]
pub mod dedupe;
#[cfg(feature = "kafka")]
pub mod dev_broker;
#[cfg(feature = "kafka")]
pub mod replayer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(feature = "kafka")]
use std::sync::Arc;

#[cfg(feature = "kafka")]
use rdkafka::client::ClientContext;
#[cfg(feature = "kafka")]
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
#[cfg(feature = "kafka")]
use rdkafka::ClientConfig;

use crate::config::{ConfigError, EventsConfig, KafkaConfig, Limits};

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
pub fn value_fit(
    k: &KafkaConfig,
    limits: &Limits,
    events: &EventsConfig,
) -> Result<usize, ConfigError> {
    let max = match k.librdkafka.get("message.max.bytes") {
        None => LIBRDKAFKA_MESSAGE_MAX_BYTES,
        Some(v) => v.parse().map_err(|_| {
            ConfigError::Invalid("kafka.librdkafka.message.max.bytes is not a number".into())
        })?,
    };
    // librdkafka's header size: per header a varint key length (<= 5), the
    // key, a varint value length (<= 5), the value. Every header a record
    // can carry must be counted here, or its events get 202 and then a dead
    // letter.
    let header = |name: &str, value: usize| 10 + name.len() + value;
    let utf8_max = |chars: usize| chars * 4;
    let headers = header("id", utf8_max(limits.max_id_chars))
        + header("tenant", 64)
        + header("received_at", TIMESTAMP_MAX)
        + header("seq", SEQ_MAX)
        + header(crate::instance::HEADER, crate::instance::ID_LEN)
        + header("error", ERROR_HEADER_MAX)
        + header("original_topic", k.topic.len());
    // The key is one of the event's fields. Known fields have a bound of
    // their own; any other field is part of the value, so at most its size.
    let key = match events.key_field.as_str() {
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
        return Err(ConfigError::Invalid(format!(
            "kafka.librdkafka.message.max.bytes ({max}) leaves {fit} bytes for an event after the key and headers; at least 1024 are needed"
        )));
    }
    Ok(fit)
}

pub fn validate(k: &KafkaConfig) -> Result<(), ConfigError> {
    let bad = |m: String| Err(ConfigError::Invalid(m));
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
                "kafka.librdkafka.{key:?} cannot be set: sluice relies on its own value"
            ));
        }
    }
    // librdkafka itself rejects unknown properties and bad values.
    #[cfg(feature = "kafka")]
    producer_config(k, "localhost:9092")
        .create_native_config()
        .map_err(|e| ConfigError::Invalid(format!("kafka.librdkafka: {e}")))?;
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

/// Replay state shared with `/stats`, `/ready` and receipts.
#[derive(Debug, Default)]
pub struct ReplayStats {
    pub connected: AtomicBool,
    /// Highest sequence number with every record at or below it confirmed
    /// (in memory; `committed` is the flushed one).
    pub delivered_through: AtomicU64,
    pub committed: AtomicU64,
    pub produced: AtomicU64,
    pub delivered: AtomicU64,
    pub retries: AtomicU64,
    /// Records produced again alone after a permanent error on their batch.
    pub isolated_retries: AtomicU64,
    pub producer_recreations: AtomicU64,
    /// librdkafka fatal errors seen (each recreates the producer).
    pub fatal_errors: AtomicU64,
    pub dead_lettered_topic: AtomicU64,
    pub dead_lettered_file: AtomicU64,
    pub gap_records: AtomicU64,
    /// Offset stores moved to quarantine at start (unreadable or missing).
    pub offset_store_resets: AtomicU64,
    /// Partial dead-letter lines (ENOSPC, kill) truncated before an append.
    pub dead_letter_partial_lines: AtomicU64,
    pub in_flight: AtomicU64,
    pub peak_in_flight: AtomicU64,
    /// Produce-to-report latency, when metrics are on.
    pub delivery_latency: std::sync::OnceLock<prometheus::Histogram>,
}

impl ReplayStats {
    pub fn set_connected(&self, up: bool, why: &str) {
        if self.connected.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("Kafka reachable: deliveries confirmed");
            } else {
                tracing::warn!(
                    reason = why,
                    "Kafka unreachable: replay backs off; ingest continues until the WAL quota"
                );
            }
        }
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

#[cfg(all(test, feature = "kafka"))]
mod tests {
    use crate::config::Config;

    /// The Kafka TLS + SASL example of docs/security.md is accepted by the
    /// librdkafka sluice is built with (it refuses `SASL_SSL` when built
    /// without OpenSSL), and the reserved guarantees cannot be overridden.
    #[test]
    fn the_documented_sasl_ssl_passthrough_is_valid() {
        let c = Config::from_toml(
            r#"
[kafka]
brokers = "kafka-1.example.net:9093"
[kafka.librdkafka]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "sluice"
"sasl.password" = "from-a-secret-store"
"ssl.ca.location" = "/etc/sluice/kafka-ca.pem"
"ssl.endpoint.identification.algorithm" = "https"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.kafka
            .librdkafka
            .insert("security.protocol".into(), "SASL_TLS".into());
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("security.protocol"), "{err}");
        let mut reserved = c;
        reserved.kafka.librdkafka.insert("acks".into(), "1".into());
        assert!(reserved.validate().is_err());
    }
}
