//! Validating and normalizing one event, and building the Kafka record it
//! becomes. Each event is judged alone.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::value::RawValue;
use serde_json::Value;

use super::config::{EventsConfig, Limits};
use super::raw;
use crate::auth::TenantScope;
use crate::tenant::TenantId;
use crate::wal::record;
#[cfg(test)]
use crate::wal::Record;

/// Kafka header names set at ingest (the replayer adds `seq`). Defined
/// here, where the records are built; `replay::producer` re-exports them
/// (the dependency goes from replay to ingest, never back).
pub const HEADER_ID: &str = "id";
pub const HEADER_TENANT: &str = "tenant";
pub const HEADER_RECEIVED_AT: &str = "received_at";

/// Epoch values at or above this are milliseconds, below it seconds.
/// 1e11 seconds is the year 5138; 1e11 milliseconds is March 1973.
const EPOCH_MS_THRESHOLD: f64 = 1e11;

/// Why one event was rejected. `kind()` is a stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("{0}")]
    Malformed(String),
    #[error("event must be a JSON object")]
    NotObject,
    #[error("missing required field {0:?}")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
    #[error("event is {size} bytes after normalization; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("event nesting is deeper than {0}")]
    TooDeep(usize),
    /// The request's key may not write the event's tenant.
    #[error("{0}")]
    Forbidden(crate::auth::TenantDenied),
    /// The stream takes only its `allowed-tenants`; the tenant (or none).
    #[error("stream {stream:?} does not take {}", .tenant.as_deref().map_or("events without a tenant_id".to_string(), |t| format!("tenant_id {t:?}")))]
    StreamForbidden {
        stream: String,
        tenant: Option<String>,
    },
}

impl EventError {
    /// Every value [`EventError::kind`] returns, for metrics that exist at 0
    /// before the first rejection.
    pub const KINDS: [&'static str; 7] = [
        "malformed",
        "not_object",
        "missing_field",
        "invalid_field",
        "too_large",
        "too_deep",
        "forbidden",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            EventError::Malformed(_) => "malformed",
            EventError::NotObject => "not_object",
            EventError::Missing(_) => "missing_field",
            EventError::Invalid(_) => "invalid_field",
            EventError::TooLarge { .. } => "too_large",
            EventError::TooDeep(_) => "too_deep",
            EventError::Forbidden(_) | EventError::StreamForbidden { .. } => "forbidden",
        }
    }
}

/// The time a request was received, with the two texts every event of the
/// request writes from it, formatted once per request rather than per event.
#[derive(Debug, Clone)]
pub struct ReceivedAt {
    time: DateTime<Utc>,
    /// RFC 3339 with milliseconds: the `received_at` header.
    header: String,
    /// RFC 3339 as an event's own timestamp is written: the value's
    /// `timestamp` when the event has none.
    ts: String,
}

impl ReceivedAt {
    pub fn new(time: DateTime<Utc>) -> Self {
        ReceivedAt {
            time,
            header: time.to_rfc3339_opts(SecondsFormat::Millis, true),
            ts: time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        }
    }
}

/// An event ready for the WAL.
#[derive(Debug, Clone)]
pub struct NormalizedEvent {
    pub id: String,
    pub tenant: Option<String>,
    /// The encoded [`crate::wal::Record`]: the WAL payload and the Kafka record.
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub struct Normalizer {
    limits: Limits,
    events: EventsConfig,
    /// The stream written into every record.
    stream: String,
    /// Tenants the stream takes; empty: any, or none.
    allowed_tenants: Vec<String>,
    /// Extra severity names (upper case) and the level each stands for.
    severity_aliases: Vec<(String, &'static str)>,
}

impl Normalizer {
    /// A normalizer for the default stream.
    pub fn new(limits: Limits, events: EventsConfig) -> Self {
        Normalizer {
            limits,
            events,
            stream: crate::wal::DEFAULT_STREAM.to_string(),
            allowed_tenants: Vec::new(),
            severity_aliases: Vec::new(),
        }
    }

    /// Also takes each `(name, level)` severity, `level` being one of the
    /// built-in names. An error names the alias when `level` is not one, when
    /// `name` is itself a built-in name (built-in names are looked up first,
    /// so the alias would never apply), or when two names are the same
    /// alias (names match trimmed and ASCII case-insensitively).
    pub fn with_severity_aliases(
        mut self,
        aliases: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, String> {
        for (name, level) in aliases {
            if let Some(builtin) = normalize_severity(name) {
                return Err(format!(
                    "severity alias {name:?}: {:?} is a built-in severity (it means {builtin}) and cannot be redefined; built-in: {}",
                    name.trim(),
                    BUILTIN_SEVERITIES
                ));
            }
            let level = normalize_severity(level).ok_or_else(|| {
                format!("severity alias {name:?} maps to {level:?}, which is not one of TRACE, DEBUG, INFO, WARN, ERROR, FATAL")
            })?;
            let up = name.trim().to_ascii_uppercase();
            if self.severity_aliases.iter().any(|(n, _)| *n == up) {
                return Err(format!(
                    "severity alias {name:?}: {up:?} is given twice (names match without case)"
                ));
            }
            self.severity_aliases.push((up, level));
        }
        Ok(self)
    }

    /// The level a `severity` names: a built-in name or an alias (OTLP's
    /// `severity_text` is read the same way).
    pub(crate) fn severity(&self, s: &str) -> Option<&'static str> {
        normalize_severity(s).or_else(|| {
            let up = s.trim().to_ascii_uppercase();
            self.severity_aliases
                .iter()
                .find(|(name, _)| *name == up)
                .map(|(_, level)| *level)
        })
    }

    /// The same schema for the stream `name`, taking only `allowed_tenants`
    /// (any tenant when empty).
    pub fn for_stream(mut self, name: &str, allowed_tenants: &[String]) -> Self {
        self.stream = name.to_string();
        self.allowed_tenants = allowed_tenants.to_vec();
        self
    }

    /// The id an event carries, for error reports, if it is a string.
    pub fn claimed_id(value: &Value) -> Option<String> {
        match value.get("id") {
            Some(Value::String(s)) => Some(s.chars().take(128).collect()),
            _ => None,
        }
    }

    /// Normalizes an event with no tenant restriction (auth disabled).
    pub fn normalize(
        &self,
        value: Value,
        received_at: DateTime<Utc>,
    ) -> Result<NormalizedEvent, EventError> {
        self.normalize_for(value, received_at, &TenantScope::Any)
    }

    /// [`Normalizer::normalize_raw`] for an event already held as a value.
    pub fn normalize_for(
        &self,
        value: Value,
        received_at: DateTime<Utc>,
        scope: &TenantScope,
    ) -> Result<NormalizedEvent, EventError> {
        let text =
            serde_json::to_string(&value).map_err(|e| EventError::Malformed(e.to_string()))?;
        let raw: &RawValue =
            serde_json::from_str(&text).map_err(|e| EventError::Malformed(e.to_string()))?;
        self.normalize_raw(raw, received_at, scope)
            .map_err(|(e, _)| e)
    }

    /// Normalizes one event from its raw JSON text, for a request whose key
    /// grants `scope`. A key bound to one tenant fills in a missing
    /// `tenant_id`; any other tenant (or none, for a key bound to several) is
    /// refused. The error carries the id the event claimed, for the report.
    ///
    /// Only the top-level fields are split out; nested values stay text, so
    /// an event costs little more than its own bytes at any shape or depth.
    /// Stages: list the fields, extract and check the known ones, choose the
    /// Kafka key, encode the value, build the record.
    pub fn normalize_raw(
        &self,
        raw: &RawValue,
        received_at: DateTime<Utc>,
        scope: &TenantScope,
    ) -> Result<NormalizedEvent, (EventError, Option<String>)> {
        self.normalize_at(raw, &ReceivedAt::new(received_at), scope)
    }

    /// [`Normalizer::normalize_raw`] with the request's time already
    /// formatted: what a request of many events calls for each.
    pub fn normalize_at(
        &self,
        raw: &RawValue,
        received_at: &ReceivedAt,
        scope: &TenantScope,
    ) -> Result<NormalizedEvent, (EventError, Option<String>)> {
        let mut fields = self.list_fields(raw.get()).map_err(|e| (e, None))?;
        // Decoded only for an error report: most events pass.
        let claimed_raw = fields.iter().find(|(k, _)| k == "id").map(|(_, v)| *v);
        let fail = |e: EventError| {
            let claimed = claimed_raw
                .and_then(|v| raw::string(v).ok().flatten())
                .map(|s| s.chars().take(128).collect::<String>());
            (e, claimed)
        };
        let known = self
            .extract(&mut fields, received_at, scope)
            .map_err(fail)?;
        let key = self.kafka_key(&known, &fields);
        // The Kafka headers, and the value written straight into the WAL
        // payload: one allocation per event for all of it.
        let id = (HEADER_ID, known.id.as_bytes());
        let received = (HEADER_RECEIVED_AT, received_at.header.as_bytes());
        let with_tenant;
        let without_tenant;
        let headers: &[(&str, &[u8])] = match &known.tenant {
            Some(t) => {
                with_tenant = [id, (HEADER_TENANT, t.as_bytes()), received];
                &with_tenant
            }
            None => {
                without_tenant = [id, received];
                &without_tenant
            }
        };
        // The value is about the size sent plus what normalization adds (an
        // id, a timestamp).
        let hint = raw.get().len().min(self.limits.max_event_bytes) + 96;
        let payload = record::encode_with(
            &self.stream,
            key.as_deref(),
            headers,
            known.timestamp.timestamp_millis(),
            hint,
            |out| self.encode_value(&known, &fields, out),
        )
        .map_err(fail)?;
        Ok(NormalizedEvent {
            id: known.id,
            tenant: known.tenant,
            payload,
        })
    }

    /// The top-level fields of an object, in the order sent. A repeated key
    /// keeps its first position and its last value, as a JSON object read
    /// into a map would.
    fn list_fields<'a>(&self, text: &'a str) -> Result<Fields<'a>, EventError> {
        let l = &self.limits;
        if !text.starts_with('{') {
            return Err(EventError::NotObject);
        }
        // Every distinct field adds at least `"k":0,` (or `"":0,`) to the
        // output, so an event with more fields than this cannot fit: stop
        // collecting them rather than hold millions of entries.
        let max_fields = l.max_event_bytes / 4 + 1;
        let listed = match raw::fields(text, max_fields)
            .map_err(|e| EventError::Malformed(e.to_string()))?
        {
            raw::Fields::Object(f) => f,
            raw::Fields::TooMany => {
                return Err(EventError::TooLarge {
                    size: raw::compact(text, None).0,
                    limit: l.max_event_bytes,
                })
            }
        };
        // A scan finds a repeat faster than hashing up to this many keys;
        // the list is deduplicated in place, so no second list.
        if listed.len() <= 16 {
            let mut listed = listed;
            let mut n = 0;
            for i in 0..listed.len() {
                match listed[..n].iter().position(|(f, _)| *f == listed[i].0) {
                    Some(j) => listed[j].1 = listed[i].1,
                    None => {
                        listed.swap(n, i);
                        n += 1;
                    }
                }
            }
            listed.truncate(n);
            return Ok(listed);
        }
        let mut fields: Fields<'a> = Vec::with_capacity(listed.len());
        let mut index = std::collections::HashMap::with_capacity(listed.len());
        for (k, v) in listed {
            match index.get(&k) {
                Some(&i) => fields[i] = (k, v),
                None => {
                    index.insert(k.clone(), fields.len());
                    fields.push((k, v));
                }
            }
        }
        Ok(fields)
    }

    /// Takes the known fields out of `fields` (what is left is unknown) and
    /// checks them: depth, required fields, each known field's form, and
    /// the tenant against `scope`.
    fn extract<'a>(
        &self,
        fields: &mut Fields<'a>,
        received_at: &'a ReceivedAt,
        scope: &TenantScope,
    ) -> Result<Known<'a>, EventError> {
        let l = &self.limits;
        // A scalar adds no depth: only containers need the scan.
        if fields
            .iter()
            .any(|(_, v)| is_container(v) && 1 + raw::compact(v.get(), None).1 > l.max_depth)
        {
            return Err(EventError::TooDeep(l.max_depth));
        }
        let mut take = |name: &str| -> Option<&'a RawValue> {
            let i = fields.iter().position(|(k, _)| k == name)?;
            Some(fields.remove(i).1)
        };
        let sent = [
            ("id", take("id")),
            ("tenant_id", take("tenant_id")),
            ("timestamp", take("timestamp")),
            ("severity", take("severity")),
            ("source", take("source")),
            ("message", take("message")),
            ("metadata", take("metadata")),
        ];
        let implied = scope.implied();
        self.check_required(&sent, fields, implied)?;
        let [(_, id), (_, tenant), (_, timestamp), (_, severity), (_, source), (_, message), (_, metadata)] =
            sent;

        let id = match string_field(id, "id must be a string")? {
            None => {
                let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                uuid::Uuid::now_v7()
                    .hyphenated()
                    .encode_lower(&mut buf)
                    .to_string()
            }
            Some(s) => {
                let n = s.chars().count();
                if n == 0 || n > l.max_id_chars {
                    return Err(invalid(format!(
                        "id must be 1 to {} characters",
                        l.max_id_chars
                    )));
                }
                s.into_owned()
            }
        };
        let tenant_msg = "tenant_id must match [A-Za-z0-9._-]{1,64}";
        let tenant = match string_field(tenant, tenant_msg)? {
            None => implied.map(str::to_string),
            Some(s) if TenantId::is_valid(&s) => Some(s.into_owned()),
            Some(_) => return Err(invalid(tenant_msg)),
        };
        scope
            .check(tenant.as_deref())
            .map_err(EventError::Forbidden)?;
        if !self.allowed_tenants.is_empty()
            && !tenant
                .as_deref()
                .is_some_and(|t| self.allowed_tenants.iter().any(|a| a == t))
        {
            return Err(EventError::StreamForbidden {
                stream: self.stream.clone(),
                tenant,
            });
        }
        let timestamp = match timestamp {
            None => None,
            Some(v) if v.get() == "null" => None,
            Some(v) => Some(parse_timestamp(v)?),
        };
        let severity_msg =
            "severity must be one of TRACE, DEBUG, INFO, WARN, WARNING, ERROR, FATAL";
        let severity = match string_field(severity, "severity must be a string")? {
            None => "INFO",
            Some(s) => match self.severity(&s) {
                Some(level) => level,
                None if self.severity_aliases.is_empty() => return Err(invalid(severity_msg)),
                None => {
                    let extra: Vec<&str> = self
                        .severity_aliases
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect();
                    return Err(invalid(format!("{severity_msg}, {}", extra.join(", "))));
                }
            },
        };
        let source = match string_field(source, "source must be a string")? {
            None => None,
            Some(s) => {
                // The limit is on the characters sent: lower-casing can
                // lengthen a string (`İ` becomes two characters).
                let s = trimmed(s);
                if s.chars().count() > l.max_source_chars {
                    return Err(invalid(format!(
                        "source is longer than {} characters",
                        l.max_source_chars
                    )));
                }
                // Most sources are already lower-case ASCII: kept as sent.
                if s.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
                    Some(Cow::Owned(s.to_lowercase()))
                } else {
                    Some(s)
                }
            }
        };
        let message = string_field(message, "message must be a string")?.map(trimmed);
        let metadata = match metadata {
            None => None,
            Some(v) if v.get() == "null" => None,
            Some(v) if v.get().starts_with('{') => Some(v),
            Some(_) => return Err(invalid("metadata must be an object")),
        };
        let (ts, timestamp) = match timestamp {
            None => (Cow::Borrowed(received_at.ts.as_str()), received_at.time),
            Some(t) => (
                Cow::Owned(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
                t,
            ),
        };
        Ok(Known {
            ts,
            id,
            tenant,
            timestamp,
            severity,
            source,
            message,
            metadata,
        })
    }

    /// Every `events.required` field is present, not null and, if a string,
    /// not blank; a key bound to one tenant supplies a missing `tenant_id`.
    fn check_required(
        &self,
        sent: &[(&str, Option<&RawValue>)],
        unknown: &Fields<'_>,
        implied: Option<&str>,
    ) -> Result<(), EventError> {
        for field in &self.events.required {
            let v = match sent.iter().find(|(k, _)| k == field) {
                Some((_, v)) => *v,
                None => unknown.iter().find(|(k, _)| k == field).map(|(_, v)| *v),
            };
            if field == "tenant_id" && implied.is_some() && v.is_none_or(|v| v.get() == "null") {
                continue;
            }
            match v.map(|v| (v.get(), raw::string(v))) {
                None | Some(("null", _)) => return Err(EventError::Missing(field.clone())),
                Some((_, Ok(Some(s)))) if s.trim().is_empty() => {
                    return Err(invalid(format!("{field} is empty")))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The Kafka key: the normalized value of `events.key-field` (a known
    /// field), or an unknown field's string (its compact JSON if not a string).
    fn kafka_key<'b>(
        &self,
        known: &'b Known<'_>,
        unknown: &'b Fields<'_>,
    ) -> Option<Cow<'b, [u8]>> {
        let text = |s: &'b str| Cow::Borrowed(s.as_bytes());
        match self.events.key_field.as_str() {
            "id" => Some(text(&known.id)),
            "tenant_id" => known.tenant.as_deref().map(text),
            "timestamp" => Some(text(&known.ts)),
            "severity" => Some(text(known.severity)),
            "source" => known.source.as_deref().map(text),
            "message" => known.message.as_deref().map(text),
            "metadata" => known.metadata.map(|m| Cow::Owned(compact_text(m))),
            other => match unknown.iter().find(|(k, _)| k == other) {
                None => None,
                Some((_, v)) => match raw::string(v) {
                    Ok(None) => None,
                    Ok(Some(Cow::Borrowed(s))) => Some(text(s)),
                    Ok(Some(Cow::Owned(s))) => Some(Cow::Owned(s.into_bytes())),
                    Err(()) => Some(Cow::Owned(compact_text(v))),
                },
            },
        }
    }

    /// The record value: known fields first in a fixed order, then unknown
    /// ones verbatim (compact, numbers and escapes as sent) in the order the
    /// client sent them, written straight to bytes.
    fn encode_value(
        &self,
        known: &Known<'_>,
        unknown: &Fields<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<(), EventError> {
        let limit = self.limits.max_event_bytes;
        let mut out = JsonObject::start(buf);
        out.field("id", &known.id)?;
        if let Some(t) = &known.tenant {
            out.field("tenant_id", t)?;
        }
        out.field("timestamp", &known.ts)?;
        out.field("severity", known.severity)?;
        if let Some(s) = &known.source {
            out.field("source", s)?;
        }
        if let Some(m) = &known.message {
            out.field("message", m)?;
        }
        if let Some(m) = known.metadata {
            out.key("metadata")?;
            raw::compact(m.get(), Some(out.buf));
        }
        // The size is known before a byte of an unknown field is copied, so
        // an oversized event never costs more than the limit to refuse.
        let mut size = out.len() + 1;
        for (k, v) in unknown {
            size += k.len() + 4 + compact_len(v);
        }
        if size > limit {
            return Err(EventError::TooLarge { size, limit });
        }
        for (k, v) in unknown {
            out.key(k)?;
            raw::compact(v.get(), Some(out.buf));
        }
        let size = out.finish();
        if size > limit {
            return Err(EventError::TooLarge { size, limit });
        }
        Ok(())
    }
}

/// An event's top-level fields as sent: name and raw value.
type Fields<'a> = Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>;

/// The known fields, checked and normalized; borrowed from the body (or the
/// request's time) where normalization left them as sent.
struct Known<'a> {
    id: String,
    tenant: Option<String>,
    timestamp: DateTime<Utc>,
    /// `timestamp` as RFC 3339, as written in the value (and the key).
    ts: Cow<'a, str>,
    severity: &'static str,
    source: Option<Cow<'a, str>>,
    message: Option<Cow<'a, str>>,
    /// Checked to be an object; written compact.
    metadata: Option<&'a RawValue>,
}

/// `s` without leading and trailing whitespace, borrowed when it was.
fn trimmed(s: Cow<'_, str>) -> Cow<'_, str> {
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
        Cow::Owned(o) if o.trim().len() == o.len() => Cow::Owned(o),
        Cow::Owned(o) => Cow::Owned(o.trim().to_string()),
    }
}

/// A known field that must be a string when present.
fn string_field<'a>(
    v: Option<&'a RawValue>,
    msg: &str,
) -> Result<Option<Cow<'a, str>>, EventError> {
    match v {
        None => Ok(None),
        Some(v) => raw::string(v).map_err(|()| invalid(msg)),
    }
}

/// Whether a raw value is an object or an array (else a scalar, whose text
/// has no whitespace outside its string and so is already compact).
fn is_container(v: &RawValue) -> bool {
    v.get().starts_with(['{', '['])
}

/// The length of a raw value's compact text.
fn compact_len(v: &RawValue) -> usize {
    if is_container(v) {
        raw::compact(v.get(), None).0
    } else {
        v.get().len()
    }
}

/// The compact text of a raw value.
fn compact_text(v: &RawValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.get().len());
    raw::compact(v.get(), Some(&mut out));
    out
}

/// A JSON object written field by field at the end of a buffer.
struct JsonObject<'b> {
    buf: &'b mut Vec<u8>,
    /// Where the object starts in `buf`.
    at: usize,
}

impl<'b> JsonObject<'b> {
    fn start(buf: &'b mut Vec<u8>) -> Self {
        let at = buf.len();
        buf.push(b'{');
        JsonObject { buf, at }
    }

    /// Bytes written so far.
    fn len(&self) -> usize {
        self.buf.len() - self.at
    }

    /// A string field.
    fn field(&mut self, key: &str, value: &str) -> Result<(), EventError> {
        self.key(key)?;
        write_json_str(self.buf, value)
    }

    fn key(&mut self, key: &str) -> Result<(), EventError> {
        if self.len() > 1 {
            self.buf.push(b',');
        }
        write_json_str(self.buf, key)?;
        self.buf.push(b':');
        Ok(())
    }

    /// Closes the object; its length.
    fn finish(self) -> usize {
        self.buf.push(b'}');
        self.len()
    }
}

/// Writes `s` as a JSON string. Most strings need no escape: those are
/// copied whole after a word-at-a-time check; any other goes through
/// serde_json's escaper, so the output is the same byte for byte.
fn write_json_str(out: &mut Vec<u8>, s: &str) -> Result<(), EventError> {
    if needs_escape(s.as_bytes()) {
        return serde_json::to_writer(&mut *out, s)
            .map_err(|e| EventError::Malformed(e.to_string()));
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
    Ok(())
}

/// Whether a string has a byte JSON must escape: a control character
/// (below 0x20), a quote or a backslash. Eight bytes at a time with the
/// classic word tests ("has a byte less than n", "has a zero byte"): a borrow
/// can flag a byte above a real hit but never flags a word without one, so
/// the answer is exact.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        let w = u64::from_le_bytes(a);
        let hit = (w.wrapping_sub(ONES * 0x20) & !w & HIGH)
            | has_zero(w ^ (ONES * u64::from(b'"')))
            | has_zero(w ^ (ONES * u64::from(b'\\')));
        if hit != 0 {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

fn invalid(msg: impl Into<String>) -> EventError {
    EventError::Invalid(msg.into())
}

/// The severity names every stream takes, for messages.
const BUILTIN_SEVERITIES: &str = "TRACE, DEBUG, INFO, WARN, WARNING, ERROR, FATAL";

fn normalize_severity(s: &str) -> Option<&'static str> {
    const LEVELS: [(&str, &str); 7] = [
        ("INFO", "INFO"),
        ("WARN", "WARN"),
        ("ERROR", "ERROR"),
        ("DEBUG", "DEBUG"),
        ("WARNING", "WARN"),
        ("TRACE", "TRACE"),
        ("FATAL", "FATAL"),
    ];
    let s = s.trim();
    LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|&(_, level)| level)
}

/// The first and last millisecond a Kafka record time can carry through
/// librdkafka (0 means "now", a negative time means none) that RFC 3339 can
/// also write (years up to 9999).
const MIN_TIMESTAMP_MS: i64 = 1;
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// RFC 3339 (any offset), or epoch seconds or milliseconds as a number or a
/// numeric string (one rule for both); the result is UTC, and every form must
/// land in the same range once converted.
fn parse_timestamp(raw: &RawValue) -> Result<DateTime<Utc>, EventError> {
    let bad = || {
        invalid("timestamp must be RFC 3339 (e.g. 2024-05-01T12:00:00Z) or epoch seconds or milliseconds")
    };
    let in_range = |dt: DateTime<Utc>| {
        // Compared as instants, not as truncated milliseconds: .9999Z in
        // the last second of 9999 truncates to .999 but lies past it.
        let bounds = (
            Utc.timestamp_millis_opt(MIN_TIMESTAMP_MS).single(),
            Utc.timestamp_millis_opt(MAX_TIMESTAMP_MS).single(),
        );
        let within = match bounds {
            (Some(lo), Some(hi)) => lo <= dt && dt <= hi,
            _ => false,
        };
        if within {
            Ok(dt)
        } else {
            Err(invalid(
                "timestamp is out of range: 1970-01-01T00:00:00.001Z to 9999-12-31T23:59:59.999Z",
            ))
        }
    };
    let epoch = |n: f64| -> Result<DateTime<Utc>, EventError> {
        if !n.is_finite() {
            return Err(bad());
        }
        let ms = if n.abs() >= EPOCH_MS_THRESHOLD {
            n
        } else {
            n * 1000.0
        };
        // Checked as a float first: `as i64` saturates, it does not fail.
        if !(MIN_TIMESTAMP_MS as f64 - 0.5..=MAX_TIMESTAMP_MS as f64 + 0.5).contains(&ms) {
            return in_range(DateTime::<Utc>::MIN_UTC);
        }
        let dt = Utc
            .timestamp_millis_opt(ms.round() as i64)
            .single()
            .ok_or_else(bad)?;
        in_range(dt)
    };
    let t = raw.get();
    if t.starts_with(['{', '[']) {
        return Err(bad());
    }
    // The text is valid JSON: a string, or a number when it starts like one
    // (a JSON number is also Rust's f64 syntax; one beyond f64 reads as
    // infinite, which `epoch` refuses).
    let text = if t.starts_with('"') {
        raw::string(raw).ok().flatten()
    } else {
        None
    };
    match text {
        None if t.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
            epoch(t.parse::<f64>().map_err(|_| bad())?)
        }
        Some(s) => {
            let s = s.trim();
            if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
                return in_range(dt.with_timezone(&Utc));
            }
            // The same numbers a JSON number may spell, exponent included.
            match s.parse::<f64>() {
                Ok(n)
                    if s.bytes().all(|b| {
                        b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E')
                    }) =>
                {
                    epoch(n)
                }
                _ => Err(bad()),
            }
        }
        None => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn norm() -> Normalizer {
        Normalizer::new(Limits::default(), EventsConfig::default())
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap()
    }

    fn value_of(e: &NormalizedEvent) -> (Record, Value) {
        let r = Record::decode(&e.payload).unwrap();
        let v = serde_json::from_slice(&r.value).unwrap();
        (r, v)
    }

    #[test]
    fn normalizes_every_known_field_and_keeps_unknown_ones_verbatim() {
        let e = norm()
            .normalize(
                json!({"zeta": 1, "message": "  hi  ", "source": "  API-Gateway ",
                       "severity": "warning", "tenant_id": "acme",
                       "timestamp": "2024-05-01T14:00:00.5+02:00",
                       "metadata": {"k": [1, 2]}, "big": 123456789012345678901234567890u128}),
                now(),
            )
            .unwrap();
        let (r, v) = value_of(&e);
        assert_eq!(v["message"], "hi");
        assert_eq!(v["source"], "api-gateway");
        assert_eq!(v["severity"], "WARN");
        assert_eq!(v["timestamp"], "2024-05-01T12:00:00.500Z");
        assert_eq!(v["metadata"], json!({"k": [1, 2]}));
        assert_eq!(v["zeta"], 1);
        let text = String::from_utf8(r.value.clone()).unwrap();
        assert!(
            text.contains("123456789012345678901234567890"),
            "exact: {text}"
        );
        assert!(text.starts_with(r#"{"id":"#), "known fields first: {text}");
        assert_eq!(r.key.as_deref(), Some(&b"acme"[..]));
        assert_eq!(r.header("tenant"), Some(&b"acme"[..]));
        assert_eq!(r.timestamp_ms, now().timestamp_millis() + 500);
        assert_eq!(uuid::Uuid::parse_str(&e.id).unwrap().get_version_num(), 7);
    }

    #[test]
    fn value_bytes_are_exact_and_the_key_comes_from_any_field() {
        let input = json!({"zeta": {"b": 1, "a": [true, null]}, "id": "e-1", "message": " m\"x ",
                           "source": "Src", "tenant_id": "acme", "alpha": 2.5,
                           "metadata": {"k": "v"}, "n": 7});
        let expected = concat!(
            r#"{"id":"e-1","tenant_id":"acme","timestamp":"2024-05-01T12:00:00Z","#,
            r#""severity":"INFO","source":"src","message":"m\"x","metadata":{"k":"v"},"#,
            r#""zeta":{"b":1,"a":[true,null]},"alpha":2.5,"n":7}"#
        );
        for (field, key) in [
            ("tenant_id", Some("acme")),
            ("id", Some("e-1")),
            ("timestamp", Some("2024-05-01T12:00:00Z")),
            ("severity", Some("INFO")),
            ("source", Some("src")),
            ("message", Some("m\"x")),
            ("metadata", Some(r#"{"k":"v"}"#)),
            ("zeta", Some(r#"{"b":1,"a":[true,null]}"#)),
            ("n", Some("7")),
            ("absent", None),
        ] {
            let events = EventsConfig {
                key_field: field.into(),
                ..EventsConfig::default()
            };
            let n = Normalizer::new(Limits::default(), events);
            let (r, _) = value_of(&n.normalize(input.clone(), now()).unwrap());
            assert_eq!(String::from_utf8(r.value).unwrap(), expected, "{field}");
            assert_eq!(r.key.as_deref(), key.map(str::as_bytes), "{field}");
        }
    }

    #[test]
    fn epoch_seconds_and_milliseconds() {
        let n = norm();
        for ts in [
            json!(1714564800),
            json!(1714564800000u64),
            json!("1714564800"),
            json!(1714564800.0),
        ] {
            let e = n
                .normalize(
                    json!({"tenant_id": "a", "source": "s", "message": "m", "timestamp": ts}),
                    now(),
                )
                .unwrap();
            assert_eq!(value_of(&e).1["timestamp"], "2024-05-01T12:00:00Z", "{ts}");
        }
        let err = n
            .normalize(
                json!({"tenant_id": "a", "source": "s", "message": "m", "timestamp": 1e300}),
                now(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("out of range"));
    }

    #[test]
    fn the_last_millisecond_is_the_limit_at_any_precision() {
        let n = norm();
        let at = |ts: &str| {
            n.normalize(
                json!({"tenant_id": "a", "source": "s", "message": "m", "timestamp": ts}),
                now(),
            )
        };
        let ok = at("9999-12-31T23:59:59.999Z").unwrap();
        assert_eq!(value_of(&ok).1["timestamp"], "9999-12-31T23:59:59.999Z");
        for past in [
            "9999-12-31T23:59:59.9999Z",
            "9999-12-31T23:59:59.999000001Z",
            "9999-12-31T23:30:00-01:00",
        ] {
            let err = at(past).unwrap_err();
            assert!(err.to_string().contains("out of range"), "{past}: {err}");
        }
        assert!(at("1970-01-01T00:00:00.0005Z").is_err());
    }

    #[test]
    fn each_rule_has_its_message() {
        let n = norm();
        let base = json!({"tenant_id": "a", "source": "s", "message": "m"});
        let with = |k: &str, v: Value| {
            let mut o = base.clone();
            o[k] = v;
            n.normalize(o, now()).unwrap_err().to_string()
        };
        assert_eq!(
            with("tenant_id", json!("ａcme")),
            "tenant_id must match [A-Za-z0-9._-]{1,64}"
        );
        assert_eq!(
            with("tenant_id", json!("x".repeat(65))),
            "tenant_id must match [A-Za-z0-9._-]{1,64}"
        );
        assert!(with("severity", json!("LOUD")).starts_with("severity must be one of"));
        assert!(with("timestamp", json!("yesterday")).starts_with("timestamp must be RFC 3339"));
        assert_eq!(with("metadata", json!([1])), "metadata must be an object");
        assert_eq!(
            with("id", json!("x".repeat(129))),
            "id must be 1 to 128 characters"
        );
        assert_eq!(with("message", json!("   ")), "message is empty");
        let mut o = base.clone();
        o.as_object_mut().unwrap().remove("source");
        assert_eq!(
            n.normalize(o, now()).unwrap_err(),
            EventError::Missing("source".into())
        );
        assert_eq!(
            n.normalize(json!([1]), now()).unwrap_err(),
            EventError::NotObject
        );
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        // Every byte that needs an escape, at every offset of a word and in
        // the tail, among plain and multi-byte text.
        let mut cases = vec![String::new(), "plain ascii text, long enough".into()];
        for special in ['"', '\\', '\n', '\u{0}', '\u{1f}', '\u{7f}', 'é', '€', '😀'] {
            for at in 0..20 {
                let mut s: String = "x".repeat(at);
                s.push(special);
                s.push_str("tail");
                cases.push(s);
            }
        }
        for s in cases {
            let mut out = Vec::new();
            write_json_str(&mut out, &s).unwrap();
            assert_eq!(out, serde_json::to_vec(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn severity_is_matched_without_regard_to_case() {
        for (sent, level) in [
            ("warning", Some("WARN")),
            (" Warn ", Some("WARN")),
            ("fatal", Some("FATAL")),
            ("TRACE", Some("TRACE")),
            ("inf", None),
            ("WARNINGS", None),
            ("ınfo", None),
        ] {
            assert_eq!(normalize_severity(sent), level, "{sent}");
        }
    }

    #[test]
    fn depth_and_size_limits() {
        let mut deep = json!(1);
        for _ in 0..64 {
            deep = json!({ "d": deep });
        }
        let e = norm()
            .normalize(
                json!({"tenant_id": "a", "source": "s", "message": "m", "x": deep}),
                now(),
            )
            .unwrap_err();
        assert_eq!(e, EventError::TooDeep(64));
        let e = norm()
            .normalize(
                json!({"tenant_id": "a", "source": "s", "message": "x".repeat(1024 * 1024)}),
                now(),
            )
            .unwrap_err();
        assert!(matches!(e, EventError::TooLarge { limit: 1048576, .. }));
    }
}
