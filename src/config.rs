//! Configuration: a TOML file with kebab-case keys, then `SLUICE_*`
//! environment variables and CLI flags on top (see `cli.rs`). Every field's
//! doc ends with its default.
//!
//! Each section lives with the stage that owns it and validates itself;
//! this module composes them, re-exports them, and checks what spans
//! sections. No stage imports this module.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::auth::config::{AuthConfig, RatesConfig, TenantRates};
pub use crate::http::config::HttpConfig;
pub use crate::ingest::config::{EventsConfig, Limits, DEFAULT_MAX_EVENT_BYTES};
use crate::replay::producer::EventBounds;
pub use crate::replay::{KafkaConfig, ReplayConfig};
pub use crate::wal::config::WalSettings;
use crate::wal::WalConfig;

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
    pub otlp: crate::ingest::otlp::OtlpConfig,
    /// Named streams besides the default one (file only; see
    /// [`crate::streams`]). Default: none, so the default stream serves
    /// every ingest path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<crate::streams::StreamConfig>,
    /// `sluice archive` (Kafka to hourly files).
    pub archive: crate::archive::ArchiveConfig,
    /// Where `sluice serve` replays the WAL: Kafka, or `[archive]`'s files.
    pub sink: crate::replay::SinkConfig,
}

/// The config file's sections, for environment names and error pointers.
pub const SECTIONS: [&str; 13] = [
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
    "otlp",
    "archive",
    "sink",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json` (one object per line). Default `text`.
    pub format: String,
    /// A tracing filter such as `info` or `sluice=debug,rdkafka=warn`;
    /// `RUST_LOG`, when set, wins. Default `info`.
    pub level: String,
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !["text", "json"].contains(&self.format.as_str()) {
            return Err(format!("log.format {:?} is not text or json", self.format));
        }
        Ok(())
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
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
            otlp: Default::default(),
            streams: Vec::new(),
            archive: Default::default(),
            sink: Default::default(),
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

    /// What bounds an event's key and headers, for the producer's size check.
    fn event_bounds(&self) -> EventBounds<'_> {
        EventBounds {
            max_id_chars: self.limits.max_id_chars,
            max_source_chars: self.limits.max_source_chars,
            key_field: &self.events.key_field,
        }
    }

    /// The largest event value the producer takes, key and headers included
    /// (see [`crate::replay::value_fit`]), for the stream that takes least.
    pub fn producer_event_fit(&self) -> Result<usize, ConfigError> {
        let mut fit = crate::replay::value_fit(&self.kafka, &self.event_bounds())
            .map_err(ConfigError::Invalid)?;
        for s in &self.streams {
            let mut kafka = self.kafka.clone();
            kafka.topic = s.topic.clone();
            let bounds = EventBounds {
                key_field: &s.key_field,
                ..self.event_bounds()
            };
            fit = fit.min(crate::replay::value_fit(&kafka, &bounds).map_err(ConfigError::Invalid)?);
        }
        Ok(fit)
    }

    /// Every stream, resolved (the default one first).
    pub fn streams(&self) -> crate::streams::Streams {
        crate::streams::Streams::resolve(&self.limits, &self.events, &self.kafka, &self.streams)
    }

    /// The event size limit ingest enforces: `limits.max-event-bytes`, or,
    /// when that is left at its default, the default lowered to what the
    /// producer takes. An explicit value above that is refused by
    /// [`Config::validate`].
    pub fn effective_max_event_bytes(&self) -> Result<usize, ConfigError> {
        Ok(self.limits.max_event_bytes.min(self.producer_event_fit()?))
    }

    /// Rejects values that cannot work together: each section's own checks,
    /// in the order of the file, then those across sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = || -> Result<(), String> {
            self.limits.validate()?;
            self.wal.validate()?;
            self.events.validate()?;
            self.http.validate()?;
            self.auth.validate()?;
            self.rates.validate(self.limits.max_events_per_request)?;
            self.log.validate()?;
            self.otlp.validate()?;
            self.idempotency.validate()?;
            self.kafka
                .validate(&self.event_bounds(), self.limits.explicit_max_event_bytes())?;
            self.replay.validate()?;
            self.archive.validate()?;
            for (key, name) in self.archive.field_names() {
                crate::ingest::config::check_field_name(key, name)?;
            }
            crate::streams::validate(&self.kafka, &self.streams)?;
            // Each stream's key field and topic bound the value too.
            for st in &self.streams {
                let mut kafka = self.kafka.clone();
                kafka.topic = st.topic.clone();
                let bounds = EventBounds {
                    key_field: &st.key_field,
                    ..self.event_bounds()
                };
                kafka
                    .validate(&bounds, self.limits.explicit_max_event_bytes())
                    .map_err(|e| format!("streams.{}: {e}", st.name))?;
            }
            // What `serve` computes before it binds must not fail after.
            self.producer_event_fit().map_err(|e| match e {
                ConfigError::Invalid(m) => m,
                other => other.to_string(),
            })?;
            Ok(())
        };
        checks().map_err(ConfigError::Invalid)
    }

    /// Applies `SLUICE_<SECTION>_<KEY>` environment variables, e.g.
    /// `SLUICE_WAL_SEGMENT_BYTES=1048576` for `wal.segment-bytes` and
    /// `SLUICE_DATA_DIR`. Shorthands: `SLUICE_LISTEN` (http.listen),
    /// `SLUICE_BROKERS` (kafka.brokers), `SLUICE_TOPIC` (kafka.topic). Lists
    /// are a TOML array (`[]`, `["a","b"]`) or comma-separated (`a,b`). An unknown `SLUICE_` name is an error, so a typo
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

impl From<&Config> for crate::http::StateConfig {
    fn from(c: &Config) -> Self {
        crate::http::StateConfig {
            http: c.http.clone(),
            limits: c.limits.clone(),
            events: c.events.clone(),
            rates: c.rates.clone(),
            idempotency: c.idempotency.clone(),
            otlp: c.otlp.clone(),
            kafka: c.kafka.clone(),
            streams: c.streams.clone(),
        }
    }
}

/// Parses an environment value into the type the setting already has.
fn env_value(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    Ok(match current {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| "not an integer")?),
        Value::Boolean(_) => Value::Boolean(raw.trim().parse().map_err(|_| "not true or false")?),
        // A TOML array when it starts with `[`: the only way to say "empty
        // list" (the comma form of "" is ambiguous with unset) and to put a
        // comma inside an item. Otherwise the comma form.
        Value::Array(_) if raw.trim_start().starts_with('[') => {
            let parsed: toml::Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|_| r#"not a TOML array (write ["a", "b"] or a,b)"#)?;
            match parsed.get("v") {
                Some(Value::Array(items)) if items.iter().all(Value::is_str) => {
                    Value::Array(items.clone())
                }
                Some(Value::Array(_)) => return Err("list items must be strings".into()),
                _ => return Err(r#"not a TOML array (write ["a", "b"] or a,b)"#.into()),
            }
        }
        // "" (or only commas) would clear the list silently, e.g. from an
        // empty line in an EnvironmentFile: the empty list is written `[]`.
        Value::Array(_) if raw.split(',').all(|s| s.trim().is_empty()) => {
            return Err(r#"empty: write [] for an empty list, or leave the variable unset"#.into())
        }
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

/// The 1-based line of `section.key` (or a top-level `key`, or
/// `streams.NAME.key` for the `[[streams]]` entry named NAME) in a TOML text,
/// to point at the setting a semantic error names.
pub fn locate(text: &str, dotted: &str) -> Option<usize> {
    if let Some(rest) = dotted.strip_prefix("streams.") {
        let (name, key) = rest.split_once('.')?;
        return locate_stream(text, name, key);
    }
    // librdkafka's property names contain dots: `kafka.librdkafka.a.b` is
    // the key `a.b` of `[kafka.librdkafka]`.
    let (section, key) = ["kafka.librdkafka.", "archive.librdkafka."]
        .iter()
        .find_map(|p| dotted.strip_prefix(p).map(|k| (&p[..p.len() - 1], k)))
        .unwrap_or_else(|| dotted.rsplit_once('.').unwrap_or(("", dotted)));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            current = h.trim().to_string();
        } else if current == section && line_key(t) == key {
            return Some(i + 1);
        }
    }
    None
}

/// The key a `key = value` line sets.
fn line_key(line: &str) -> &str {
    line.split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"')
}

/// The line of `key` in the `[[streams]]` entry whose `name` is `name` (its
/// `[streams.KEY]` sub-table header counts), else the entry's first line.
fn locate_stream(text: &str, name: &str, key: &str) -> Option<usize> {
    // The entry being read: its first line, whether it is the one named,
    // and the line of the key in it.
    let mut entry: Option<(usize, bool, Option<usize>)> = None;
    let done = |e: Option<(usize, bool, Option<usize>)>| match e {
        Some((first, true, at)) => Some(at.unwrap_or(first)),
        _ => None,
    };
    let sub = format!("streams.{key}");
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with("[[") {
            if let Some(n) = done(entry.take()) {
                return Some(n);
            }
            if t.trim_start_matches('[').trim_end_matches(']').trim() == "streams" {
                entry = Some((i + 1, false, None));
            }
        } else if let Some(e) = entry.as_mut() {
            let header = t.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
            match header.map(str::trim) {
                Some(h) if h == sub => e.2 = e.2.or(Some(i + 1)),
                Some(h) if !h.starts_with("streams.") => {
                    if let Some(n) = done(entry.take()) {
                        return Some(n);
                    }
                }
                Some(_) => {}
                None => {
                    let k = line_key(t);
                    let value = t.split_once('=').map(|(_, v)| v.trim().trim_matches('"'));
                    if k == "name" && value == Some(name) {
                        e.1 = true;
                    } else if k == key {
                        e.2 = e.2.or(Some(i + 1));
                    }
                }
            }
        }
    }
    done(entry)
}

/// The first `section.key` (or `streams.NAME.key`) a message mentions, if
/// any.
pub fn key_in(message: &str) -> Option<&str> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        .find(|w| match w.split_once('.') {
            Some(("streams", rest)) => rest
                .split_once('.')
                .is_some_and(|(n, k)| !n.is_empty() && !k.is_empty()),
            Some((sec, k)) => SECTIONS.contains(&sec) && !k.is_empty(),
            None => false,
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
            ("SLUICE_IDEMPOTENCY_MAX_BYTES".into(), "1048576".into()),
            ("PATH".into(), "/bin".into()),
        ])
        .unwrap();
        assert_eq!(c.wal.segment_bytes, 1_048_576);
        assert_eq!(c.idempotency.max_bytes, 1_048_576);
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
    fn idempotency_max_bytes_has_a_floor() {
        let mut c = Config::default();
        assert_eq!(c.idempotency.max_bytes, 48 << 20);
        c.idempotency.max_bytes = 1000;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("idempotency.max-bytes (1000) must be at least 65536"),
            "{err}"
        );
    }

    #[test]
    fn list_from_the_environment_takes_a_toml_array_or_commas() {
        let set = |raw: &str| {
            let mut c = Config::default();
            c.apply_env([("SLUICE_EVENTS_REQUIRED".to_string(), raw.to_string())])
                .map(|()| c.events.required)
        };
        // The empty list can only be written as a TOML array.
        assert_eq!(set("[]").unwrap(), Vec::<String>::new());
        assert_eq!(set(" [ ] ").unwrap(), Vec::<String>::new());
        assert_eq!(set(r#"["a","b"]"#).unwrap(), ["a", "b"]);
        assert_eq!(set(r#"[ "a, b", 'c' ]"#).unwrap(), ["a, b", "c"]);
        assert_eq!(set("a,b").unwrap(), ["a", "b"]);
        assert_eq!(set(" message , source ").unwrap(), ["message", "source"]);
        assert_eq!(set("message").unwrap(), ["message"]);
        for empty in ["", " ", ",", " , "] {
            let err = set(empty).unwrap_err().to_string();
            assert!(
                err.contains("SLUICE_EVENTS_REQUIRED") && err.contains("write []"),
                "{empty:?}: {err}"
            );
        }
        let err = set("[a, b]").unwrap_err().to_string();
        assert!(
            err.contains("SLUICE_EVENTS_REQUIRED") && err.contains("TOML array"),
            "{err}"
        );
        let err = set("[1, 2]").unwrap_err().to_string();
        assert!(
            err.contains("SLUICE_EVENTS_REQUIRED") && err.contains("string"),
            "{err}"
        );
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
    fn stream_errors_point_at_the_line_of_the_key_in_their_entry() {
        let text = "[kafka]\ntopic = \"t\"\n[[streams]]\nname = \"a\"\nroutes = [\"/a\"]\ntopic = \"a\"\ndead-letter-topic = \"a-dlq\"\n[[streams]]\nroutes = [\"/:id\"]\nname = \"b_2\"\ntopic = \"b\"\ndead-letter-topic = \"b-dlq\"\n[streams.severity-aliases]\nWARN = \"ERROR\"\n";
        let mut c = Config::from_toml(text).unwrap();
        let err = c.validate().unwrap_err().to_string();
        let key = key_in(&err).unwrap();
        assert_eq!(key, "streams.b_2.routes", "{err}");
        assert_eq!(locate(text, key), Some(9));
        c.streams[1].routes = vec!["/b".into()];
        let err = c.validate().unwrap_err().to_string();
        let key = key_in(&err).unwrap();
        assert_eq!(key, "streams.b_2.severity-aliases", "{err}");
        assert_eq!(locate(text, key), Some(13));
        // A key the entry does not set: the entry's first line.
        assert_eq!(locate(text, "streams.a.required"), Some(3));
        assert_eq!(locate(text, "streams.c.routes"), None);
        assert_eq!(locate(text, "kafka.topic"), Some(2));
        let text = "[kafka]\ntopic = \"t\"\n[kafka.librdkafka]\n\"linger.ms\" = \"5\"\n\"no.such\" = \"1\"\n";
        assert_eq!(locate(text, "kafka.librdkafka.no.such"), Some(5));
        assert_eq!(
            key_in("kafka.librdkafka.no.such: Client config error"),
            Some("kafka.librdkafka.no.such")
        );
    }

    #[test]
    fn streams_parse_survive_the_environment_and_bound_the_event_size() {
        let text = "[limits]\nmax-event-bytes = 900000\n[[streams]]\nname = \"clicks\"\nroutes = [\"/clicks\"]\ntopic = \"clicks\"\ndead-letter-topic = \"clicks-dlq\"\nkey-field = \"type\"\n";
        let mut c = Config::from_toml(text).unwrap();
        // A key field without its own bound halves the room: 900000 no
        // longer fits that stream's records.
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("streams.clicks") && err.contains("max-event-bytes"),
            "{err}"
        );
        c.limits.max_event_bytes = 400_000;
        c.validate().unwrap();
        c.apply_env([("SLUICE_TOPIC".to_string(), "main".to_string())])
            .unwrap();
        assert_eq!(c.kafka.topic, "main", "env addresses the default stream");
        assert_eq!(c.streams.len(), 1, "and keeps [[streams]]");
        assert_eq!(c.streams[0].key_field, "type");
        assert!(c
            .apply_env([("SLUICE_STREAMS_TOPIC".to_string(), "x".to_string())])
            .is_err());
        let s = c.streams();
        let names: Vec<&str> = s.all().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["default", "clicks"]);
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

    #[cfg(feature = "kafka")]
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
