//! The `[limits]` and `[events]` sections: what ingest accepts.

use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;
/// `limits.max-event-bytes` unless set: 1 MiB, lowered to what the producer
/// takes (see `Config::effective_max_event_bytes`).
pub const DEFAULT_MAX_EVENT_BYTES: usize = MIB as usize;

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
    /// fits (998,645 bytes with librdkafka's default of 1,000,000 and the
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
    /// Declared bytes (`Content-Length`) of large bodies (over 64 KiB) being
    /// read, parsed and appended at once; more wait, unread, for their turn.
    /// A body without `Content-Length` counts as 1 MiB; one larger than this
    /// budget waits for all of it. Default 512 KiB per core, at least 1 MiB
    /// (1 MiB on 2 cores): about two 1,000-event batches per core, which
    /// keeps every core parsing while the writer and the disk work, and no
    /// more, since each body in progress holds about 7x its size.
    pub max_parsing_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct EventsConfig {
    /// Fields every event must carry. Default `["tenant_id", "source", "message"]`.
    pub required: Vec<String>,
    /// Top-level field used as the Kafka key. Default `tenant_id`.
    pub key_field: String,
}

/// `limits.max-parsing-bytes` when not set: 512 KiB per core, at least
/// 1 MiB. Measured on 2 cores with 64 connections of 1,000-event batches
/// (docs/benchmarks.md): 4 MiB held 113-122 MiB RSS at 427-517k events/s,
/// 1 MiB 79-94 MiB at 528-593k: more bodies parsed at once than cores only
/// spread the same CPU over more memory and colder caches.
pub fn default_max_parsing_bytes() -> u64 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    (cores * 512 * 1024).max(MIB)
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
            max_parsing_bytes: default_max_parsing_bytes(),
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

impl Limits {
    /// Rejects limits that cannot work together.
    pub fn validate(&self) -> Result<(), String> {
        let l = self;
        if l.max_event_bytes == 0 || l.max_body_bytes == 0 || l.max_events_per_request == 0 {
            return Err("limits must be positive".into());
        }
        if l.max_event_bytes as u64 > l.max_body_bytes {
            return Err(format!(
                "limits.max-event-bytes ({}) exceeds limits.max-body-bytes ({})",
                l.max_event_bytes, l.max_body_bytes
            ));
        }
        if l.max_inflight_bytes < l.max_body_bytes {
            return Err(format!(
                "limits.max-inflight-bytes ({}) is below limits.max-body-bytes ({}): no full-size request could ever be admitted",
                l.max_inflight_bytes, l.max_body_bytes
            ));
        }
        if l.max_parsing_bytes == 0 {
            return Err("limits.max-parsing-bytes must be positive".into());
        }
        if l.max_depth == 0 || l.max_depth > 128 {
            return Err(
                "limits.max-depth must be 1..=128 (the JSON parser's own limit is 128)".into(),
            );
        }
        Ok(())
    }

    /// The explicit `max-event-bytes`, or `None` when left at its default
    /// (which is then lowered to what the producer takes, not refused).
    pub fn explicit_max_event_bytes(&self) -> Option<usize> {
        Some(self.max_event_bytes).filter(|&b| b != DEFAULT_MAX_EVENT_BYTES)
    }
}

impl EventsConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.check("events")
    }

    /// The field-name rule ([`check_field_name`]) over `required` and
    /// `key-field`, for the settings under `section` (`events`, or a
    /// stream's `streams.NAME`).
    pub fn check(&self, section: &str) -> Result<(), String> {
        for name in &self.required {
            check_field_name(&format!("{section}.required"), name)?;
        }
        check_field_name(&format!("{section}.key-field"), &self.key_field)
    }
}

/// The longest field name a setting may give.
pub const MAX_FIELD_NAME_CHARS: usize = 256;

/// The rule for every setting that names an event field (`required`,
/// `key-field`, `archive.timestamp-field`, `archive.fields`,
/// `otlp.tenant-attribute`): 1 to 256 characters, no control characters, no
/// white space at either end. Names are matched exactly, case and dots
/// included (`log.level` is a top-level key of that name for ingest), so a
/// name breaking this rule could only match a field no client sends: an
/// empty `required` entry would refuse every event. `key` is the setting,
/// for the message.
pub fn check_field_name(key: &str, name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > MAX_FIELD_NAME_CHARS {
        return Err(format!(
            "{key}: field name {name:?} must have 1 to {MAX_FIELD_NAME_CHARS} characters"
        ));
    }
    if name.trim() != name {
        return Err(format!(
            "{key}: field name {name:?} starts or ends with white space; names are matched exactly"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{key}: field name {name:?} contains the control character {c:?}"
        ));
    }
    Ok(())
}
