//! The `[kafka]` and `[replay]` sections.

use serde::{Deserialize, Serialize};

use super::producer::{self, EventBounds};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated. Empty means the embedded dev
    /// broker. Default empty.
    pub brokers: String,
    /// Topic for events. Default `events`.
    pub topic: String,
    /// Topic for records Kafka permanently refuses. Default `events-dlq`.
    pub dead_letter_topic: String,
    /// `compression.type`: none, gzip, snappy, lz4 or zstd. Default `lz4`.
    pub compression: String,
    /// `linger.ms`. Default 5.
    pub linger_ms: u64,
    /// `batch.size` in bytes. Default 1000000.
    pub batch_size: u64,
    /// `message.timeout.ms`: after this, librdkafka gives a record up and
    /// sluice produces it again from the committed offset. Default 300000.
    pub message_timeout_ms: u64,
    /// Partitions of each topic the dev broker creates. Default 3.
    pub dev_partitions: i32,
    /// Any other librdkafka producer property, passed through as is
    /// (security.protocol, sasl.*, ssl.*, ...). `acks` and
    /// `enable.idempotence` are sluice's guarantees and cannot be set here.
    /// Default empty.
    pub librdkafka: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReplayConfig {
    /// Records produced but not yet confirmed, at most. This bounds replay
    /// memory (records plus librdkafka's per-message overhead) however large
    /// the backlog. Default 10000.
    pub max_in_flight: usize,
    /// How often the committed offset is flushed to disk (then GC runs), in
    /// milliseconds. A longer interval means more duplicates after a crash,
    /// never a loss. Default 200.
    pub commit_interval_ms: u64,
    /// First backoff after a failed delivery, in milliseconds; doubles up to
    /// `backoff-max-ms`. Default 100.
    pub backoff_initial_ms: u64,
    /// Default 30000.
    pub backoff_max_ms: u64,
    /// On shutdown, how long to wait for in-flight deliveries before exiting;
    /// what does not drain stays in the WAL. Default 10000.
    pub drain_timeout_ms: u64,
    /// Steps of nice value (0-19) that the replay thread and the threads it
    /// starts (librdkafka's, and its blocking pool) run below ingest's
    /// priority (capped at nice 19). Replay runs on its own thread,
    /// off the HTTP workers; above 0 the kernel gives ingest the cores first
    /// when both want them, and replay takes what is left, so a 202's
    /// latency does not queue behind produce work. A sustained load that
    /// leaves no idle CPU then grows the backlog (bounded by the WAL's disk
    /// limits, drained when load falls) instead of slowing ingest. 0 keeps
    /// replay at ingest's priority. Default 10.
    pub nice: i32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            topic: "events".into(),
            dead_letter_topic: "events-dlq".into(),
            compression: "lz4".into(),
            linger_ms: 5,
            batch_size: 1_000_000,
            message_timeout_ms: 300_000,
            dev_partitions: 3,
            librdkafka: Default::default(),
        }
    }
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            max_in_flight: 10_000,
            commit_interval_ms: 200,
            backoff_initial_ms: 100,
            backoff_max_ms: 30_000,
            drain_timeout_ms: 10_000,
            nice: 10,
        }
    }
}

impl KafkaConfig {
    /// Checks `[kafka]`, then that an event of `limits`' size fits a Kafka
    /// record: `explicit_max_event_bytes` (a `limits.max-event-bytes` that
    /// was set, not defaulted) above what the producer takes is refused,
    /// since such events would get 202 and then go to the dead letters.
    pub fn validate(
        &self,
        limits: &EventBounds,
        explicit_max_event_bytes: Option<usize>,
    ) -> Result<(), String> {
        producer::validate(self)?;
        let fit = producer::value_fit(self, limits)?;
        if let Some(max) = explicit_max_event_bytes.filter(|&m| m > fit) {
            return Err(format!(
                "limits.max-event-bytes ({max}) exceeds what the producer's message.max.bytes carries after the key and headers ({fit}): such events would get 202 and then go to the dead letters. Lower it, or raise kafka.librdkafka.message.max.bytes (and the broker's and topic's limits)"
            ));
        }
        Ok(())
    }
}

impl ReplayConfig {
    pub fn validate(&self) -> Result<(), String> {
        let r = self;
        if r.max_in_flight == 0 || r.commit_interval_ms == 0 || r.backoff_initial_ms == 0 {
            return Err("replay values must be positive".into());
        }
        if r.backoff_max_ms < r.backoff_initial_ms {
            return Err("replay.backoff-max-ms is below replay.backoff-initial-ms".into());
        }
        if !(0..=19).contains(&r.nice) {
            return Err(format!(
                "replay.nice = {} is outside 0-19 (a lower priority than ingest's, never a higher one)",
                r.nice
            ));
        }
        Ok(())
    }
}

/// Where replay delivers the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKind {
    /// Kafka (`[kafka]`).
    #[default]
    Kafka,
    /// The hourly NDJSON files and summaries of `[archive]` (its `dir`,
    /// layout and analytics settings); no broker is used.
    Files,
}

/// The `[sink]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct SinkConfig {
    /// `kafka` or `files`. Default `kafka`.
    pub kind: SinkKind,
}
