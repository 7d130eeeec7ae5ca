//! Configuration: a TOML file with kebab-case keys, then `SLUICE_*`
//! environment variables and CLI flags on top (see `cli.rs`). Every field's
//! doc ends with its default.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::wal::WalConfig;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// `limits.max-event-bytes` unless set: 1 MiB, lowered to what the producer
/// takes (see [`Config::effective_max_event_bytes`]).
pub const DEFAULT_MAX_EVENT_BYTES: usize = MIB as usize;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Root of the WAL, offsets, quarantine and dead-letter directories.
    /// Default `./sluice-data`.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub limits: Limits,
    pub events: EventsConfig,
    pub wal: WalSettings,
    pub kafka: KafkaConfig,
    pub replay: ReplayConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub rates: RatesConfig,
    pub idempotency: crate::idempotency::IdempotencyConfig,
}

/// The config file's sections, for environment names and error pointers.
pub const SECTIONS: [&str; 10] = [
    "http",
    "limits",
    "events",
    "wal",
    "kafka",
    "replay",
    "log",
    "auth",
    "rates",
    "idempotency",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AuthConfig {
    /// The API keys file (see docs/security.md). Empty disables
    /// authentication: any client may write any tenant, which is only safe on
    /// a trusted network. Default empty.
    pub keys_file: PathBuf,
    /// How often the keys file is checked for changes, in milliseconds; a
    /// SIGHUP reloads at once. Default 2000.
    pub reload_interval_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys_file: PathBuf::new(),
            reload_interval_ms: 2000,
        }
    }
}

/// Token-bucket rate limits. A rate of 0 means unlimited; a burst of 0 means
/// one second's worth of the rate. Over a limit: 429 with `Retry-After`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RatesConfig {
    /// Requests per second per API key. Default 0.
    pub key_requests_per_sec: u32,
    /// Default 0.
    pub key_requests_burst: u32,
    /// Events per second per API key. Default 0.
    pub key_events_per_sec: u32,
    /// Default 0.
    pub key_events_burst: u32,
    /// Requests per second per tenant (a request counts once for each tenant
    /// it writes). Default 0.
    pub tenant_requests_per_sec: u32,
    /// Default 0.
    pub tenant_requests_burst: u32,
    /// Events per second per tenant. Default 0.
    pub tenant_events_per_sec: u32,
    /// Keep it at or above `limits.max-events-per-request`, or the largest
    /// batches can never pass (they get 413). Default 0.
    pub tenant_events_burst: u32,
    /// Distinct tenants that get their own label in per-tenant metrics; the
    /// rest are counted as `other`. Default 0 (then 100).
    pub tenant_metrics_cap: usize,
    /// Per-tenant overrides, `[rates.tenant.<name>]` with `requests-per-sec`,
    /// `requests-burst`, `events-per-sec`, `events-burst`; unset keys keep
    /// the global value. Default none.
    pub tenant: std::collections::BTreeMap<String, TenantRates>,
}

impl RatesConfig {
    pub fn tenant_metrics_cap(&self) -> usize {
        if self.tenant_metrics_cap == 0 {
            100
        } else {
            self.tenant_metrics_cap
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct TenantRates {
    pub requests_per_sec: Option<u32>,
    pub requests_burst: Option<u32>,
    pub events_per_sec: Option<u32>,
    pub events_burst: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json` (one object per line). Default `text`.
    pub format: String,
    /// A tracing filter such as `info` or `sluice=debug,rdkafka=warn`;
    /// `RUST_LOG`, when set, wins. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Seconds a client is told to wait (`Retry-After`) when the WAL is full,
    /// the disk is low or the daemon is shutting down. Default 5.
    pub retry_after_secs: u64,
    /// A request body must arrive within this many milliseconds, else 408.
    /// Default 30000.
    pub body_timeout_ms: u64,
    /// Request headers must arrive within this many milliseconds, else the
    /// connection is closed (slowloris). It also bounds how long an idle
    /// keep-alive connection waits for its next request. Default 10000.
    pub header_timeout_ms: u64,
    /// Largest request head (request line and headers) in bytes; larger gets
    /// 431. At least 8192. Default 65536.
    pub max_header_bytes: usize,
    /// Open connections at most; past it, new connections are closed at
    /// once. Default 10000 (raise LimitNOFILE to match).
    pub max_connections: usize,
    /// Deadline for a whole ingest request, from its head to the answer, in
    /// milliseconds. It never cuts a WAL append in half: a batch handed to
    /// the writer is written whole or not at all, and a client whose
    /// deadline passes while its batch is being fsynced gets 503 (the
    /// events may still be delivered; their ids make a retry safe to
    /// deduplicate). Default 60000.
    pub request_timeout_ms: u64,
    /// PEM certificate chain for HTTPS. Empty (with `tls-key-file`) serves
    /// plain HTTP. Reloaded on SIGHUP. Default empty.
    pub tls_cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `tls-cert-file`.
    /// Default empty.
    pub tls_key_file: PathBuf,
}

/// Ingest limits. All sizes apply after decompression.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Limits {
    /// Bytes of request body. Default 10 MiB.
    pub max_body_bytes: u64,
    /// Events in one request. Default 10000.
    pub max_events_per_request: usize,
    /// Bytes of one normalized event (its Kafka value). Its whole Kafka
    /// record (key and headers included) must fit the producer's
    /// `message.max.bytes`: at the default, the limit is lowered to what
    /// fits (998,591 bytes with librdkafka's default of 1,000,000 and the
    /// default key field); an explicit value that does not fit is refused.
    /// Default 1 MiB, lowered as said.
    pub max_event_bytes: usize,
    /// Nesting depth of an event's JSON (the event object itself is depth 1).
    /// Default 64.
    pub max_depth: usize,
    /// Characters in an `id`. Default 128.
    pub max_id_chars: usize,
    /// Characters in `source`. Default 256.
    pub max_source_chars: usize,
    /// Bytes of request bodies held in memory at once, across all requests.
    /// Past it, requests get 503 at once rather than queueing. Default 256 MiB.
    pub max_inflight_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct EventsConfig {
    /// Fields every event must carry. Default `["tenant_id", "source", "message"]`.
    pub required: Vec<String>,
    /// Top-level field used as the Kafka key. Default `tenant_id`.
    pub key_field: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct WalSettings {
    /// Segment size before a roll. Default 64 MiB.
    pub segment_bytes: u64,
    /// Quota on bytes of segments; past it ingest answers 503. Default 8 GiB.
    pub max_bytes: u64,
    /// Free disk space to keep; below it ingest answers 503. Default 512 MiB.
    pub min_free_bytes: u64,
    /// Upper bound of one group commit. Default 16 MiB.
    pub max_group_bytes: u64,
    /// Append requests queued for the writer. Default 1024.
    pub queue_depth: usize,
}

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
    /// Stall limit: when records are in flight and no delivery report came
    /// for this long, replay drops the producer and produces again from the
    /// last confirmed record. librdkafka's own `message.timeout.ms` is
    /// infinite (0 disables this check too). Default 300000.
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
    /// the backlog. Records produced and not yet covered by the flushed
    /// offset are bounded at twice this, which bounds what a kill makes
    /// replay produce again. Default 10000.
    pub max_in_flight: usize,
    /// The longest time between flushes of the committed offset (then GC
    /// runs), in milliseconds. Flushes come as often as every 10 ms while one
    /// costs at most a tenth of the time between them, and at once when the
    /// unflushed window is full. A longer interval means more duplicates
    /// after a crash, never a loss. Default 200.
    pub commit_interval_ms: u64,
    /// First backoff after a failed delivery, in milliseconds; doubles up to
    /// `backoff-max-ms`. Default 100.
    pub backoff_initial_ms: u64,
    /// Default 30000.
    pub backoff_max_ms: u64,
    /// On shutdown, how long to wait for in-flight deliveries before exiting;
    /// what does not drain stays in the WAL. Default 10000.
    pub drain_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("sluice-data"),
            http: HttpConfig::default(),
            limits: Limits::default(),
            events: EventsConfig::default(),
            wal: WalSettings::default(),
            kafka: KafkaConfig::default(),
            replay: ReplayConfig::default(),
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            rates: RatesConfig::default(),
            idempotency: Default::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            retry_after_secs: 5,
            body_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            request_timeout_ms: 60_000,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 10 * MIB,
            max_events_per_request: 10_000,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_depth: 64,
            max_id_chars: 128,
            max_source_chars: 256,
            max_inflight_bytes: 256 * MIB,
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            required: vec!["tenant_id".into(), "source".into(), "message".into()],
            key_field: "tenant_id".into(),
        }
    }
}

impl Default for WalSettings {
    fn default() -> Self {
        WalSettings {
            segment_bytes: 64 * MIB,
            max_bytes: 8 * GIB,
            min_free_bytes: 512 * MIB,
            max_group_bytes: 16 * MIB,
            queue_depth: 1024,
        }
    }
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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses a TOML file. Unknown keys are errors, reported with their line.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The largest event value the producer takes, key and headers included
    /// (see [`crate::kafka::value_fit`]).
    pub fn producer_event_fit(&self) -> Result<usize, ConfigError> {
        crate::kafka::value_fit(&self.kafka, &self.limits, &self.events)
    }

    /// The event size limit ingest enforces: `limits.max-event-bytes`, or,
    /// when that is left at its default, the default lowered to what the
    /// producer takes. An explicit value above that is refused by
    /// [`Config::validate`].
    pub fn effective_max_event_bytes(&self) -> Result<usize, ConfigError> {
        Ok(self.limits.max_event_bytes.min(self.producer_event_fit()?))
    }

    /// Rejects values that cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if l.max_event_bytes == 0 || l.max_body_bytes == 0 || l.max_events_per_request == 0 {
            return bad("limits must be positive".into());
        }
        if l.max_event_bytes as u64 > l.max_body_bytes {
            return bad(format!(
                "limits.max-event-bytes ({}) exceeds limits.max-body-bytes ({})",
                l.max_event_bytes, l.max_body_bytes
            ));
        }
        if l.max_inflight_bytes < l.max_body_bytes {
            return bad(format!(
                "limits.max-inflight-bytes ({}) is below limits.max-body-bytes ({}): no full-size request could ever be admitted",
                l.max_inflight_bytes, l.max_body_bytes
            ));
        }
        if l.max_depth == 0 || l.max_depth > 128 {
            return bad(
                "limits.max-depth must be 1..=128 (the JSON parser's own limit is 128)".into(),
            );
        }
        if self.wal.segment_bytes < 4096 {
            return bad("wal.segment-bytes must be at least 4096".into());
        }
        if self.wal.max_bytes < 2 * self.wal.segment_bytes {
            return bad(format!(
                "wal.max-bytes ({}) must hold at least two segments of wal.segment-bytes ({})",
                self.wal.max_bytes, self.wal.segment_bytes
            ));
        }
        if self.events.key_field.is_empty() {
            return bad("events.key-field must not be empty".into());
        }
        let h = &self.http;
        if h.max_header_bytes < 8192 {
            return bad("http.max-header-bytes must be at least 8192".into());
        }
        if h.max_connections == 0
            || h.header_timeout_ms == 0
            || h.body_timeout_ms == 0
            || h.request_timeout_ms == 0
        {
            return bad("http.max-connections and the http timeouts must be positive".into());
        }
        if h.tls_cert_file.as_os_str().is_empty() != h.tls_key_file.as_os_str().is_empty() {
            return bad("http.tls-cert-file and http.tls-key-file must be set together".into());
        }
        if self.auth.reload_interval_ms == 0 {
            return bad("auth.reload-interval-ms must be positive".into());
        }
        let rt = &self.rates;
        let batch = l.max_events_per_request as u64;
        let burst = |rate: u32, burst: u32| if burst == 0 { rate } else { burst } as u64;
        for (name, rate, b) in [
            (
                "rates.tenant-events-burst",
                rt.tenant_events_per_sec,
                rt.tenant_events_burst,
            ),
            (
                "rates.key-events-burst",
                rt.key_events_per_sec,
                rt.key_events_burst,
            ),
        ] {
            if rate > 0 && burst(rate, b) < batch {
                tracing::warn!(
                    "{name} ({}) is below limits.max-events-per-request ({batch}): larger batches will get 413",
                    burst(rate, b)
                );
            }
        }
        if let Some(bad_tenant) = rt
            .tenant
            .keys()
            .find(|t| !crate::ingest::event::valid_tenant(t))
        {
            return bad(format!(
                "rates.tenant.{bad_tenant:?} is not a valid tenant id ([A-Za-z0-9._-]{{1,64}})"
            ));
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return bad(format!(
                "log.format {:?} is not text or json",
                self.log.format
            ));
        }
        crate::kafka::validate(&self.kafka)?;
        let fit = self.producer_event_fit()?;
        if l.max_event_bytes > fit && l.max_event_bytes != DEFAULT_MAX_EVENT_BYTES {
            return bad(format!(
                "limits.max-event-bytes ({}) exceeds what the producer's message.max.bytes carries after the key and headers ({fit}): such events would get 202 and then go to the dead letters. Lower it, or raise kafka.librdkafka.message.max.bytes (and the broker's and topic's limits)",
                l.max_event_bytes
            ));
        }
        let r = &self.replay;
        if r.max_in_flight == 0 || r.commit_interval_ms == 0 || r.backoff_initial_ms == 0 {
            return bad("replay values must be positive".into());
        }
        if r.backoff_max_ms < r.backoff_initial_ms {
            return bad("replay.backoff-max-ms is below replay.backoff-initial-ms".into());
        }
        Ok(())
    }

    /// Applies `SLUICE_<SECTION>_<KEY>` environment variables, e.g.
    /// `SLUICE_WAL_SEGMENT_BYTES=1048576` for `wal.segment-bytes` and
    /// `SLUICE_DATA_DIR`. Shorthands: `SLUICE_LISTEN` (http.listen),
    /// `SLUICE_BROKERS` (kafka.brokers), `SLUICE_TOPIC` (kafka.topic). Lists
    /// are comma-separated. An unknown `SLUICE_` name is an error, so a typo
    /// never goes unnoticed. `SLUICE_CONFIG` and `SLUICE_DEV` are CLI options.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        const NOT_CONFIG: [&str; 2] = ["CONFIG", "DEV"];
        let mut tree =
            toml::Value::try_from(&*self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut changed = false;
        for (name, raw) in vars {
            let Some(rest) = name.strip_prefix("SLUICE_") else {
                continue;
            };
            // Not settings: test switches and the debug-build pause hooks.
            if NOT_CONFIG.contains(&rest)
                || ["TEST_", "REQUIRE_", "DEBUG_"]
                    .iter()
                    .any(|p| rest.starts_with(p))
            {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            let (section, key) = match lower.as_str() {
                "listen" => (Some("http"), "listen".to_string()),
                "brokers" => (Some("kafka"), "brokers".to_string()),
                "topic" => (Some("kafka"), "topic".to_string()),
                _ => match lower.split_once('_') {
                    Some((sec, k)) if SECTIONS.contains(&sec) => (Some(sec), k.replace('_', "-")),
                    _ => (None, lower.replace('_', "-")),
                },
            };
            let table = match section {
                Some(sec) => tree.get_mut(sec).and_then(toml::Value::as_table_mut),
                None => tree.as_table_mut(),
            };
            let unknown = || ConfigError::Invalid(format!("{name}: no such setting"));
            let table = table.ok_or_else(unknown)?;
            let current = table.get(&key).ok_or_else(unknown)?;
            let value = env_value(current, &raw)
                .map_err(|e| ConfigError::Invalid(format!("{name}={raw:?}: {e}")))?;
            table.insert(key, value);
            changed = true;
        }
        if changed {
            *self = tree
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    pub fn wal_config(&self) -> WalConfig {
        let mut w = WalConfig::new(&self.data_dir);
        w.segment_bytes = self.wal.segment_bytes;
        w.max_bytes = self.wal.max_bytes;
        w.min_free_bytes = self.wal.min_free_bytes;
        w.max_group_bytes = self.wal.max_group_bytes as usize;
        w.queue_depth = self.wal.queue_depth;
        w
    }
}

/// Parses an environment value into the type the setting already has.
fn env_value(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    Ok(match current {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| "not an integer")?),
        Value::Boolean(_) => Value::Boolean(raw.trim().parse().map_err(|_| "not true or false")?),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        Value::Table(_) => return Err("a table cannot be set from the environment".into()),
        other => return Err(format!("unsupported type {}", other.type_str())),
    })
}

/// The 1-based line of `section.key` (or a top-level `key`) in a TOML text,
/// to point at the setting a semantic error names.
pub fn locate(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            current = h.trim().to_string();
        } else if current == section {
            let k = t.split('=').next().unwrap_or("").trim().trim_matches('"');
            if k == key {
                return Some(i + 1);
            }
        }
    }
    None
}

/// The first `section.key` a message mentions, if any.
pub fn key_in(message: &str) -> Option<&str> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        .find(|w| {
            w.split_once('.')
                .is_some_and(|(sec, k)| SECTIONS.contains(&sec) && !k.is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_keys_are_refused_with_a_line() {
        Config::default().validate().unwrap();
        let err = Config::from_toml("[limits]\nmax-body-bytes = 5\nmax-bodee = 1\n").unwrap_err();
        assert!(err.contains("max-bodee") && err.contains("line 3"), "{err}");
        let c = Config::from_toml("[limits]\nmax-event-bytes = 2048\n").unwrap();
        assert_eq!(c.limits.max_event_bytes, 2048);
        assert_eq!(c.limits.max_depth, 64, "other keys keep defaults");
    }

    #[test]
    fn example_config_is_valid_and_states_exactly_the_defaults() {
        let parsed = Config::from_toml(include_str!("../sluice.example.toml")).unwrap();
        parsed.validate().unwrap();
        assert_eq!(
            toml::to_string(&parsed).unwrap(),
            toml::to_string(&Config::default()).unwrap()
        );
    }

    #[test]
    fn environment_overrides_every_key_and_refuses_typos() {
        let mut c = Config::default();
        c.apply_env([
            (
                "SLUICE_WAL_SEGMENT_BYTES".to_string(),
                "1048576".to_string(),
            ),
            ("SLUICE_LISTEN".into(), "0.0.0.0:9000".into()),
            ("SLUICE_EVENTS_REQUIRED".into(), "message, source".into()),
            ("SLUICE_DATA_DIR".into(), "/var/lib/sluice".into()),
            ("SLUICE_LOG_FORMAT".into(), "json".into()),
            ("PATH".into(), "/bin".into()),
        ])
        .unwrap();
        assert_eq!(c.wal.segment_bytes, 1_048_576);
        assert_eq!(c.http.listen.port(), 9000);
        assert_eq!(c.events.required, ["message", "source"]);
        assert_eq!(c.data_dir, std::path::PathBuf::from("/var/lib/sluice"));
        assert_eq!(c.log.format, "json");
        let err = c
            .apply_env([("SLUICE_WAL_SEGMENT_BYTEZ".to_string(), "1".to_string())])
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("SLUICE_WAL_SEGMENT_BYTEZ: no such setting"));
        let err = c
            .apply_env([("SLUICE_WAL_MAX_BYTES".to_string(), "lots".to_string())])
            .unwrap_err();
        assert!(err.to_string().contains("not an integer"), "{err}");
    }

    #[test]
    fn semantic_errors_point_at_the_line_of_the_key() {
        let text = "data-dir = \"x\"\n[limits]\nmax-body-bytes = 100\nmax-event-bytes = 200\n";
        let c = Config::from_toml(text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        let key = key_in(&err).unwrap();
        assert_eq!(key, "limits.max-event-bytes");
        assert_eq!(locate(text, key), Some(4));
        assert_eq!(locate(text, "data-dir"), Some(1));
    }

    #[test]
    fn conflicts_are_refused() {
        let mut c = Config::default();
        c.limits.max_event_bytes = (c.limits.max_body_bytes + 1) as usize;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max-event-bytes"));
    }
}
