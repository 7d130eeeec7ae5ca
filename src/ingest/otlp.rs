//! OTLP logs (`ExportLogsServiceRequest`, protobuf or OTLP/JSON) into
//! sluice events. Each `LogRecord` becomes one event object, which then goes
//! through the same [`Normalizer`] as a `/v1/events` event, so validation,
//! limits and the tenant rule are the same for both. No HTTP here: the fuzz
//! target drives exactly this.
//!
//! The mapping (README, "Sending from OpenTelemetry", has the table):
//! - `body` → `message`: a string as is, any other kind as its JSON text;
//!   no body → `event_name`, if set.
//! - `severity_number` ranges 1-4, 5-8, 9-12, 13-16, 17-20, 21-24 →
//!   TRACE, DEBUG, INFO, WARN, ERROR, FATAL; unset (0) or out of range → the
//!   `severity_text` if it names a sluice severity, else the default (INFO).
//! - `time_unix_nano` → `timestamp`; 0 → `observed_time_unix_nano`; both 0
//!   → the receive time.
//! - resource `service.name` → `source`; the resource attribute named by
//!   `otlp.tenant-attribute` → `tenant_id` (else the API key's one tenant).
//! - `metadata`: `trace_id`/`span_id` (hex), `trace_flags`, the original
//!   `severity_number`/`severity_text`, `event_name`, `observed_timestamp`,
//!   and the log record's, resource's and scope's attributes.

use chrono::{DateTime, SecondsFormat, Utc};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod json;

use super::config::Limits;
use super::{Batch, EventError, Normalizer, Rejection};
use crate::auth::{TenantDenied, TenantScope};

/// The `[otlp]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct OtlpConfig {
    /// The resource attribute whose string value is an event's `tenant_id`.
    /// When a resource lacks it, a key bound to one tenant supplies it.
    /// Default `tenant.id`.
    pub tenant_attribute: String,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            tenant_attribute: "tenant.id".into(),
        }
    }
}

impl OtlpConfig {
    pub fn validate(&self) -> Result<(), String> {
        super::config::check_field_name("otlp.tenant-attribute", &self.tenant_attribute)
    }
}

/// The two OTLP/HTTP encodings, chosen by `Content-Type`; a response uses
/// the request's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// `application/x-protobuf` or `application/json` (parameters ignored,
    /// names case-insensitive). Anything else is a 415.
    pub fn from_content_type(ct: Option<&str>) -> Result<Encoding, String> {
        let mime = ct
            .and_then(|c| c.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase());
        match mime.as_deref() {
            Some("application/x-protobuf") | Some("application/protobuf") => {
                Ok(Encoding::Protobuf)
            }
            Some("application/json") => Ok(Encoding::Json),
            other => Err(format!(
                "unsupported media type {:?} for OTLP logs: use application/x-protobuf or application/json",
                other.unwrap_or("")
            )),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// Why a whole OTLP body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtlpError {
    /// Not a valid `ExportLogsServiceRequest` in its encoding (400).
    #[error("{0}")]
    Malformed(String),
    /// More log records than `limits.max-events-per-request` (413).
    #[error("too many log records: more than {0} in one request")]
    TooManyRecords(usize),
    /// The body would decode into more messages than its budget (413).
    #[error("body holds more than {0} protobuf/JSON messages; send smaller batches")]
    TooManyMessages(usize),
    /// The events together would exceed the expansion budget: every record
    /// carries a copy of its resource's attributes (413).
    #[error("log records expand to more than {0} bytes of events (each carries its resource's attributes); send smaller batches")]
    Expanded(u64),
}

/// Messages one request may decode into, all levels together: 64 per
/// allowed event (a record with ~30 attributes is ~60 messages). Each costs
/// at most a few hundred bytes once decoded, so the decoded tree stays in
/// the tens of MiB whatever the body's shape.
pub fn message_budget(limits: &Limits) -> usize {
    limits.max_events_per_request.saturating_mul(64)
}

/// The events of one request may total this many bytes: four times the
/// body limit.
pub fn expansion_budget(limits: &Limits) -> u64 {
    limits.max_body_bytes.saturating_mul(4)
}

/// Nesting at which the protobuf pre-scan stops: prost's own recursion
/// limit, so anything deeper fails to decode anyway.
const MAX_PROTO_DEPTH: usize = 100;

/// The pre-scan reads a byte once per message that encloses it, so its cost
/// is the body's size times its nesting. Past this many reads per body byte
/// (an OTLP log body nests about ten deep) the body is refused, so 100
/// wrappers around 10 MiB cannot cost a billion steps.
const SCAN_WORK_PER_BYTE: usize = 32;

/// Decodes the body, after checking that its decoded form stays within the
/// message budget, and that its record count is within the limit.
pub fn decode(
    encoding: Encoding,
    body: &[u8],
    limits: &Limits,
) -> Result<ExportLogsServiceRequest, OtlpError> {
    let budget = message_budget(limits);
    let request = match encoding {
        Encoding::Protobuf => {
            let mut left = budget;
            let mut work = SCAN_WORK_PER_BYTE
                .saturating_mul(body.len())
                .saturating_add(4096);
            match count_messages(body, 0, &mut left, &mut work) {
                Ok(()) | Err(Scan::NotMessage) => {}
                Err(Scan::TooMany) => return Err(OtlpError::TooManyMessages(budget)),
                Err(Scan::TooDeep) => {
                    return Err(OtlpError::Malformed(format!(
                        "protobuf messages nest too deeply: more than {MAX_PROTO_DEPTH} levels, or more than {SCAN_WORK_PER_BYTE} on average over the body"
                    )))
                }
            }
            // Log records are the large messages (about 500 bytes each
            // once decoded): count them before decoding, so 640,000 empty
            // records in a 1.3 MB body are refused without the 325 MB
            // their structs would take (hostile review).
            if count_log_records(body).is_some_and(|n| n > limits.max_events_per_request) {
                return Err(OtlpError::TooManyRecords(limits.max_events_per_request));
            }
            <ExportLogsServiceRequest as prost::Message>::decode(body)
                .map_err(|e| OtlpError::Malformed(format!("invalid OTLP protobuf: {e}")))?
        }
        Encoding::Json => {
            if json_objects(body) > budget {
                return Err(OtlpError::TooManyMessages(budget));
            }
            // The reader refuses the record past the limit as it reads it.
            json::decode(body, limits.max_events_per_request).map_err(|e| {
                if e.to_string().contains(json::TOO_MANY_RECORDS) {
                    OtlpError::TooManyRecords(limits.max_events_per_request)
                } else {
                    OtlpError::Malformed(format!("invalid OTLP/JSON: {e}"))
                }
            })?
        }
    };
    let records: usize = request
        .resource_logs
        .iter()
        .flat_map(|r| &r.scope_logs)
        .map(|s| s.log_records.len())
        .sum();
    if records > limits.max_events_per_request {
        return Err(OtlpError::TooManyRecords(limits.max_events_per_request));
    }
    Ok(request)
}

enum Scan {
    /// The bytes are not a protobuf message (so a string or bytes field).
    NotMessage,
    TooMany,
    TooDeep,
}

/// Counts, into `left`, every length-delimited field that parses as a
/// message, at every depth: an upper bound of the messages prost allocates
/// for `buf`. Schema-free, so a string that happens to parse is counted too
/// (the bound only gets safer). Each message costs at least its two wire
/// bytes, but up to ~200 bytes decoded: this is what keeps a 10 MiB body of
/// empty records or attributes from becoming gigabytes.
fn count_messages(
    mut buf: &[u8],
    depth: usize,
    left: &mut usize,
    work: &mut usize,
) -> Result<(), Scan> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    while !buf.is_empty() {
        let (_, wire) = decode_key(&mut buf).map_err(|_| Scan::NotMessage)?;
        match wire {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|_| Scan::NotMessage)?;
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                buf = buf.get(n..).ok_or(Scan::NotMessage)?;
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut buf).map_err(|_| Scan::NotMessage)?;
                let len = usize::try_from(len).map_err(|_| Scan::NotMessage)?;
                let inner = buf.get(..len).ok_or(Scan::NotMessage)?;
                buf = &buf[len..];
                *work = work.checked_sub(inner.len()).ok_or(Scan::TooDeep)?;
                // A speculative parse: on NotMessage the field is bytes and
                // whatever it counted is given back.
                let before = *left;
                let parsed = if depth + 1 >= MAX_PROTO_DEPTH {
                    // Deeper than prost decodes: a message here is refused,
                    // bytes are fine (one level, no recursion).
                    if !inner.is_empty() && is_flat_message(inner) {
                        return Err(Scan::TooDeep);
                    }
                    Err(Scan::NotMessage)
                } else {
                    count_messages(inner, depth + 1, left, work)
                };
                match parsed {
                    Ok(()) => {
                        *left = left.checked_sub(1).ok_or(Scan::TooMany)?;
                    }
                    Err(Scan::NotMessage) => *left = before,
                    Err(e) => return Err(e),
                }
            }
            WireType::StartGroup | WireType::EndGroup => return Err(Scan::NotMessage),
        }
    }
    Ok(())
}

/// The number of `LogRecord`s in an `ExportLogsServiceRequest` body
/// (`resource_logs` = 1 -> `scope_logs` = 2 -> `log_records` = 2), read
/// from the wire without decoding; `None` if the body does not parse (the
/// decoder then says why).
fn count_log_records(body: &[u8]) -> Option<usize> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    /// Calls `each` with every length-delimited field `field` of `buf`.
    fn fields<'a>(
        mut buf: &'a [u8],
        field: u32,
        mut each: impl FnMut(&'a [u8]) -> Option<()>,
    ) -> Option<()> {
        while !buf.is_empty() {
            let (tag, wire) = decode_key(&mut buf).ok()?;
            match wire {
                WireType::Varint => {
                    decode_varint(&mut buf).ok()?;
                }
                WireType::SixtyFourBit => buf = buf.get(8..)?,
                WireType::ThirtyTwoBit => buf = buf.get(4..)?,
                WireType::LengthDelimited => {
                    let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                    let inner = buf.get(..len)?;
                    buf = &buf[len..];
                    if tag == field {
                        each(inner)?;
                    }
                }
                WireType::StartGroup | WireType::EndGroup => return None,
            }
        }
        Some(())
    }
    let mut n = 0usize;
    fields(body, 1, |resource| {
        fields(resource, 2, |scope| {
            fields(scope, 2, |_| {
                n += 1;
                Some(())
            })
        })
    })?;
    Some(n)
}

/// Whether `buf` parses as one level of protobuf fields.
fn is_flat_message(mut buf: &[u8]) -> bool {
    use prost::encoding::{decode_key, decode_varint, WireType};
    while !buf.is_empty() {
        let Ok((_, wire)) = decode_key(&mut buf) else {
            return false;
        };
        let skip = match wire {
            WireType::Varint => decode_varint(&mut buf).map(|_| 0).ok(),
            WireType::SixtyFourBit => Some(8),
            WireType::ThirtyTwoBit => Some(4),
            WireType::LengthDelimited => decode_varint(&mut buf)
                .ok()
                .and_then(|n| usize::try_from(n).ok()),
            WireType::StartGroup | WireType::EndGroup => None,
        };
        match skip.and_then(|n| buf.get(n..)) {
            Some(rest) => buf = rest,
            None => return false,
        }
    }
    true
}

/// JSON objects in the body (`{` outside strings): each OTLP/JSON message is
/// one, so this bounds the decoded tree the same way.
fn json_objects(body: &[u8]) -> usize {
    let (mut n, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b'{' {
            n += 1;
        }
    }
    n
}

/// Decodes an OTLP logs body and normalizes each record, in request order
/// (resource, then scope, then record): `index` in a rejection is that
/// order's position. An empty request is an empty batch (OTLP: success).
pub fn prepare(
    encoding: Encoding,
    body: &[u8],
    limits: &Limits,
    normalizer: &Normalizer,
    config: &OtlpConfig,
    received_at: DateTime<Utc>,
    scope: &TenantScope,
) -> Result<Batch, OtlpError> {
    let request = decode(encoding, body, limits)?;
    let mut batch = Batch {
        accepted: Vec::new(),
        rejected: Vec::new(),
    };
    let budget = expansion_budget(limits);
    let mut total: u64 = 0;
    let mut index = 0usize;
    for resource_logs in &request.resource_logs {
        let resource = ResourcePart::new(resource_logs, config);
        for scope_logs in &resource_logs.scope_logs {
            let scope_meta = scope_value(scope_logs);
            // What every record of this scope carries whatever its own
            // fields: when that alone is over the event limit, each record
            // is refused without building it.
            let shared = resource.size + scope_meta.as_ref().map_or(0, json_len);
            for record in &scope_logs.log_records {
                let i = index;
                index += 1;
                if shared > limits.max_event_bytes {
                    batch.rejected.push(rejection(
                        i,
                        EventError::TooLarge {
                            size: shared,
                            limit: limits.max_event_bytes,
                        },
                    ));
                    continue;
                }
                match record_event(record, &resource, scope_meta.as_ref(), normalizer) {
                    Err(e) => batch.rejected.push(rejection(i, e)),
                    Ok(text) => match serde_json::value::RawValue::from_string(text) {
                        Err(e) => batch
                            .rejected
                            .push(rejection(i, EventError::Malformed(e.to_string()))),
                        Ok(raw) => match normalizer.normalize_raw(&raw, received_at, scope) {
                            Ok(e) => {
                                total += e.payload.len() as u64;
                                if total > budget {
                                    return Err(OtlpError::Expanded(budget));
                                }
                                batch.accepted.push(e);
                            }
                            Err((e, _)) => batch.rejected.push(rejection(i, e)),
                        },
                    },
                }
            }
        }
    }
    Ok(batch)
}

fn rejection(index: usize, e: EventError) -> Rejection {
    Rejection {
        index,
        line: None,
        id: None,
        error: e.to_string(),
        kind: e.kind(),
        tenant: match &e {
            EventError::Forbidden(TenantDenied::NotAllowed(t)) => Some(t.clone()),
            _ => None,
        },
    }
}

/// What a resource gives each of its records, computed once.
struct ResourcePart {
    source: Option<Value>,
    tenant: Option<Value>,
    attributes: Option<Value>,
    /// Compact JSON bytes of the above.
    size: usize,
}

impl ResourcePart {
    fn new(r: &ResourceLogs, config: &OtlpConfig) -> Self {
        let attrs: &[KeyValue] = r.resource.as_ref().map_or(&[], |r| &r.attributes);
        let find = |name: &str| {
            attrs
                .iter()
                .rev()
                .find(|kv| kv.key == name)
                .map(|kv| any_value(kv.value.as_ref()))
        };
        let source = find("service.name");
        let tenant = find(&config.tenant_attribute);
        let attributes = (!attrs.is_empty()).then(|| Value::Object(attributes(attrs)));
        let size = [&source, &tenant, &attributes]
            .iter()
            .map(|v| v.as_ref().map_or(0, json_len))
            .sum();
        ResourcePart {
            source,
            tenant,
            attributes,
            size,
        }
    }
}

/// The scope's name, version and attributes, when any is set.
fn scope_value(s: &ScopeLogs) -> Option<Value> {
    let scope = s.scope.as_ref()?;
    let mut m = Map::new();
    if !scope.name.is_empty() {
        m.insert("name".into(), scope.name.clone().into());
    }
    if !scope.version.is_empty() {
        m.insert("version".into(), scope.version.clone().into());
    }
    if !scope.attributes.is_empty() {
        m.insert(
            "attributes".into(),
            Value::Object(attributes(&scope.attributes)),
        );
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
}

/// One record as a sluice event object (JSON text), before normalization.
fn record_event(
    r: &LogRecord,
    resource: &ResourcePart,
    scope: Option<&Value>,
    normalizer: &Normalizer,
) -> Result<String, EventError> {
    let mut ev = Map::new();
    if let Some(t) = &resource.tenant {
        ev.insert("tenant_id".into(), t.clone());
    }
    let time = [r.time_unix_nano, r.observed_time_unix_nano]
        .into_iter()
        .find(|&t| t != 0);
    if let Some(t) = time {
        ev.insert("timestamp".into(), rfc3339_nanos(t)?.into());
    }
    let named = |text: &str| normalizer.severity(text);
    if let Some(s) = severity(r.severity_number, &r.severity_text, named) {
        ev.insert("severity".into(), s.into());
    }
    if let Some(s) = &resource.source {
        ev.insert("source".into(), s.clone());
    }
    if let Some(m) = message(r) {
        ev.insert("message".into(), m.into());
    }
    ev.insert(
        "metadata".into(),
        Value::Object(metadata(r, resource, scope)?),
    );
    serde_json::to_string(&Value::Object(ev)).map_err(|e| EventError::Malformed(e.to_string()))
}

/// A string body as is; any other body as its JSON text; no body: the
/// event name, if any.
fn message(r: &LogRecord) -> Option<String> {
    match r.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        // Its name, not the JSON text of its name (`"NaN"`).
        Some(any_value::Value::DoubleValue(d)) if !d.is_finite() => Some(double_name(*d).into()),
        Some(_) => Some(any_value(r.body.as_ref()).to_string()),
        None => (!r.event_name.is_empty()).then(|| r.event_name.clone()),
    }
}

fn metadata(
    r: &LogRecord,
    resource: &ResourcePart,
    scope: Option<&Value>,
) -> Result<Map<String, Value>, EventError> {
    let mut m = Map::new();
    let id = |name: &str, bytes: &[u8], len: usize| -> Result<Option<String>, EventError> {
        match bytes.len() {
            0 => Ok(None),
            n if n == len && bytes.iter().any(|&b| b != 0) => Ok(Some(hex::encode(bytes))),
            n if n == len => Ok(None),
            n => Err(EventError::Invalid(format!(
                "{name} must be {len} bytes ({} hex digits), not {n}",
                2 * len
            ))),
        }
    };
    if let Some(t) = id("trace_id", &r.trace_id, 16)? {
        m.insert("trace_id".into(), t.into());
    }
    if let Some(s) = id("span_id", &r.span_id, 8)? {
        m.insert("span_id".into(), s.into());
    }
    if r.flags != 0 {
        // The low byte is the W3C trace flags; the rest is reserved.
        m.insert("trace_flags".into(), (r.flags & 0xff).into());
    }
    if r.severity_number != 0 {
        m.insert("severity_number".into(), r.severity_number.into());
    }
    if !r.severity_text.is_empty() {
        m.insert("severity_text".into(), r.severity_text.clone().into());
    }
    if !r.event_name.is_empty() {
        m.insert("event_name".into(), r.event_name.clone().into());
    }
    if r.observed_time_unix_nano != 0 {
        m.insert(
            "observed_timestamp".into(),
            rfc3339_nanos(r.observed_time_unix_nano)?.into(),
        );
    }
    if !r.attributes.is_empty() {
        m.insert(
            "attributes".into(),
            Value::Object(attributes(&r.attributes)),
        );
    }
    if let Some(a) = &resource.attributes {
        m.insert("resource".into(), a.clone());
    }
    if let Some(s) = scope {
        m.insert("scope".into(), s.clone());
    }
    Ok(m)
}

/// Nanoseconds since the epoch as RFC 3339 UTC (nanosecond digits only when
/// set). Every u64 is a valid instant (up to 2554).
fn rfc3339_nanos(n: u64) -> Result<String, EventError> {
    let secs = (n / 1_000_000_000) as i64;
    let nanos = (n % 1_000_000_000) as u32;
    DateTime::from_timestamp(secs, nanos)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .ok_or_else(|| EventError::Invalid(format!("time {n} ns is out of range")))
}

/// The sluice severity of a record: the number's range, else its text as
/// the stream reads a `severity` (`named`: the built-in names and the
/// stream's `severity-aliases`). The number wins: it is the normalized
/// field, the text is the source's own spelling.
pub fn severity(
    number: i32,
    text: &str,
    named: impl Fn(&str) -> Option<&'static str>,
) -> Option<&'static str> {
    Some(match number {
        1..=4 => "TRACE",
        5..=8 => "DEBUG",
        9..=12 => "INFO",
        13..=16 => "WARN",
        17..=20 => "ERROR",
        21..=24 => "FATAL",
        _ if text.trim().is_empty() => return None,
        _ => return named(text),
    })
}

/// A non-finite double's OTLP/JSON name.
fn double_name(d: f64) -> &'static str {
    if d.is_nan() {
        "NaN"
    } else if d > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// Attributes as a JSON object; a repeated key keeps its last value.
fn attributes(kvs: &[KeyValue]) -> Map<String, Value> {
    let mut m = Map::with_capacity(kvs.len());
    for kv in kvs {
        m.insert(kv.key.clone(), any_value(kv.value.as_ref()));
    }
    m
}

/// An AnyValue as plain JSON: strings, booleans, numbers, arrays and
/// objects as themselves; bytes as base64; a non-finite double as its
/// OTLP/JSON name (`NaN`, `Infinity`, `-Infinity`: JSON has no NaN); an
/// empty value as null. The nesting is bounded by the
/// decoders (prost 100, serde_json 128).
pub fn any_value(v: Option<&AnyValue>) -> Value {
    use any_value::Value as V;
    use base64::Engine as _;
    match v.and_then(|v| v.value.as_ref()) {
        None => Value::Null,
        Some(V::StringValue(s)) => s.clone().into(),
        Some(V::BoolValue(b)) => (*b).into(),
        Some(V::IntValue(i)) => (*i).into(),
        Some(V::DoubleValue(d)) => match serde_json::Number::from_f64(*d) {
            Some(n) => Value::Number(n),
            None => double_name(*d).into(),
        },
        Some(V::ArrayValue(a)) => a.values.iter().map(|x| any_value(Some(x))).collect(),
        Some(V::KvlistValue(kv)) => Value::Object(attributes(&kv.values)),
        Some(V::BytesValue(b)) => base64::engine::general_purpose::STANDARD.encode(b).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log records are counted before they are decoded (protobuf) or as they
    /// are read (JSON): 640,000 empty records took serve to 326 MB when
    /// they were decoded first and counted after (hostile review).
    #[test]
    fn records_past_the_limit_are_refused_before_they_are_decoded() {
        use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
        let limits = Limits::default();
        let over = limits.max_events_per_request + 1;
        let req = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: vec![LogRecord::default(); over],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let proto = prost::Message::encode_to_vec(&req);
        assert_eq!(count_log_records(&proto), Some(over));
        assert!(matches!(
            decode(Encoding::Protobuf, &proto, &limits),
            Err(OtlpError::TooManyRecords(_))
        ));
        let json = format!(
            "{{\"resourceLogs\":[{{\"scopeLogs\":[{{\"logRecords\":[{}]}}]}}]}}",
            vec!["{}"; over].join(",")
        );
        assert!(matches!(
            decode(Encoding::Json, json.as_bytes(), &limits),
            Err(OtlpError::TooManyRecords(_))
        ));
        // At the limit both decode.
        let at = limits.max_events_per_request;
        let json = format!(
            "{{\"resourceLogs\":[{{\"scopeLogs\":[{{\"logRecords\":[{}]}}]}}]}}",
            vec!["{}"; at].join(",")
        );
        assert!(decode(Encoding::Json, json.as_bytes(), &limits).is_ok());
    }

    fn builtin(t: &str) -> Option<&'static str> {
        Normalizer::new(Limits::default(), Default::default()).severity(t)
    }

    #[test]
    fn severity_ranges_and_text() {
        for (n, want) in [
            (1, "TRACE"),
            (4, "TRACE"),
            (5, "DEBUG"),
            (9, "INFO"),
            (12, "INFO"),
            (13, "WARN"),
            (17, "ERROR"),
            (21, "FATAL"),
            (24, "FATAL"),
        ] {
            assert_eq!(severity(n, "info", builtin), Some(want), "{n}");
        }
        assert_eq!(severity(0, "Warning", builtin), Some("WARN"));
        assert_eq!(severity(99, "error", builtin), Some("ERROR"));
        assert_eq!(severity(0, "notice", builtin), None);
        assert_eq!(severity(-3, "", builtin), None);
        let critical = |t: &str| (t == "CRITICAL").then_some("FATAL");
        assert_eq!(severity(0, "CRITICAL", critical), Some("FATAL"));
        assert_eq!(
            severity(9, "CRITICAL", critical),
            Some("INFO"),
            "the number wins"
        );
    }

    #[test]
    fn json_object_count_skips_strings() {
        assert_eq!(json_objects(br#"{"a":"{{{\"{","b":{}}"#), 2);
    }

    #[test]
    fn nanos_render_as_rfc3339() {
        assert_eq!(
            rfc3339_nanos(1_714_564_800_123_456_789).unwrap(),
            "2024-05-01T12:00:00.123456789Z"
        );
        assert_eq!(
            rfc3339_nanos(u64::MAX).unwrap(),
            "2554-07-21T23:34:33.709551615Z"
        );
    }

    mod roundtrip {
        //! Any `ExportLogsServiceRequest`, encoded as protobuf (prost) and as
        //! OTLP/JSON (opentelemetry-proto's own `Serialize`), becomes the
        //! same events and the same rejections.
        use super::super::*;
        use opentelemetry_proto::tonic::common::v1::{
            ArrayValue, InstrumentationScope, KeyValueList,
        };
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn any_value() -> impl Strategy<Value = AnyValue> {
            use any_value::Value as V;
            let leaf = prop_oneof![
                Just(None),
                ".{0,6}".prop_map(|s| Some(V::StringValue(s))),
                any::<bool>().prop_map(|b| Some(V::BoolValue(b))),
                any::<i64>().prop_map(|i| Some(V::IntValue(i))),
                // serde_json writes a non-finite f64 as null, which is not
                // OTLP/JSON: the names are tested on their own.
                any::<f64>()
                    .prop_filter("finite", |d| d.is_finite())
                    .prop_map(|d| Some(V::DoubleValue(d))),
                vec(any::<u8>(), 0..6).prop_map(|b| Some(V::BytesValue(b))),
            ]
            .prop_map(|value| AnyValue { value });
            leaf.prop_recursive(3, 16, 3, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..3).prop_map(|values| AnyValue {
                        value: Some(any_value::Value::ArrayValue(ArrayValue { values })),
                    }),
                    vec((key(), proptest::option::of(inner)), 0..3).prop_map(|kvs| AnyValue {
                        value: Some(any_value::Value::KvlistValue(KeyValueList {
                            values: kvs
                                .into_iter()
                                .map(|(key, value)| KeyValue { key, value })
                                .collect(),
                        })),
                    }),
                ]
            })
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![Just("a".to_string()), Just("b.c".to_string()), ".{0,4}"]
        }

        fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
            vec((key(), proptest::option::of(any_value())), 0..4).prop_map(|kvs| {
                kvs.into_iter()
                    .map(|(key, value)| KeyValue { key, value })
                    .collect()
            })
        }

        fn id(len: usize) -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                Just(Vec::new()),
                vec(any::<u8>(), len),
                vec(any::<u8>(), 0..20)
            ]
        }

        fn record() -> impl Strategy<Value = LogRecord> {
            (
                (
                    prop_oneof![Just(0u64), any::<u64>()],
                    prop_oneof![Just(0u64), any::<u64>()],
                ),
                (
                    -2i32..30,
                    prop_oneof![Just(""), Just("warning"), Just("CRITICAL"), Just("x")],
                ),
                (proptest::option::of(any_value()), attributes()),
                (any::<u32>(), any::<u32>(), id(16), id(8)),
                prop_oneof![Just(String::new()), ".{0,5}"],
            )
                .prop_map(
                    |((t, o), (n, text), (body, attributes), (d, f, tr, sp), ev)| LogRecord {
                        time_unix_nano: t,
                        observed_time_unix_nano: o,
                        severity_number: n,
                        severity_text: text.into(),
                        body,
                        attributes,
                        dropped_attributes_count: d,
                        flags: f,
                        trace_id: tr,
                        span_id: sp,
                        event_name: ev,
                    },
                )
        }

        fn scope_logs() -> impl Strategy<Value = ScopeLogs> {
            (
                proptest::option::of((".{0,4}", ".{0,3}", attributes(), any::<u32>())),
                vec(record(), 0..4),
            )
                .prop_map(|(scope, log_records)| ScopeLogs {
                    scope: scope.map(|(name, version, attributes, d)| InstrumentationScope {
                        name,
                        version,
                        attributes,
                        dropped_attributes_count: d,
                    }),
                    log_records,
                    schema_url: String::new(),
                })
        }

        fn request() -> impl Strategy<Value = ExportLogsServiceRequest> {
            let resource = (
                prop_oneof![Just(None), Just(Some("acme")), Just(Some("not a tenant"))],
                prop_oneof![Just(None), Just(Some("Checkout"))],
                attributes(),
                any::<u32>(),
            )
                .prop_map(|(tenant, service, mut attributes, d)| {
                    let s = |v: &str| {
                        Some(AnyValue {
                            value: Some(any_value::Value::StringValue(v.into())),
                        })
                    };
                    if let Some(t) = tenant {
                        attributes.push(KeyValue {
                            key: "tenant.id".into(),
                            value: s(t),
                        });
                    }
                    if let Some(v) = service {
                        attributes.push(KeyValue {
                            key: "service.name".into(),
                            value: s(v),
                        });
                    }
                    Resource {
                        attributes,
                        dropped_attributes_count: d,
                        entity_refs: Vec::new(),
                    }
                });
            vec(
                (proptest::option::of(resource), vec(scope_logs(), 0..3)),
                0..3,
            )
            .prop_map(|rs| ExportLogsServiceRequest {
                resource_logs: rs
                    .into_iter()
                    .map(|(resource, scope_logs)| ResourceLogs {
                        resource,
                        scope_logs,
                        schema_url: String::new(),
                    })
                    .collect(),
            })
        }

        type Outcome = Result<(Vec<Vec<u8>>, Vec<Rejection>), OtlpError>;

        fn events(encoding: Encoding, body: &[u8]) -> Outcome {
            let limits = Limits::default();
            let aliases = [("CRITICAL".to_string(), "FATAL".to_string())].into();
            let normalizer = Normalizer::new(limits.clone(), Default::default())
                .with_severity_aliases(&aliases)
                .unwrap();
            let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
            prepare(
                encoding,
                body,
                &limits,
                &normalizer,
                &OtlpConfig::default(),
                at,
                &TenantScope::Any,
            )
            .map(|b| (b.accepted.into_iter().map(without_id).collect(), b.rejected))
        }

        /// The payload with its generated event id (a fresh UUID each time)
        /// blanked, wherever it occurs.
        fn without_id(e: crate::ingest::NormalizedEvent) -> Vec<u8> {
            let (id, mut p) = (e.id.as_bytes(), e.payload);
            let mut i = 0;
            while let Some(at) = p[i..].windows(id.len()).position(|w| w == id) {
                p[i + at..i + at + id.len()].fill(b'0');
                i += at + id.len();
            }
            p
        }

        /// What the generator leaves out (serde_json writes a non-finite
        /// f64 as null): the OTLP/JSON names against prost's doubles.
        #[test]
        fn non_finite_doubles_are_the_same_in_both_encodings() {
            let double = |d: f64| AnyValue {
                value: Some(any_value::Value::DoubleValue(d)),
            };
            let attributes = [
                ("nan", f64::NAN),
                ("inf", f64::INFINITY),
                ("ninf", f64::NEG_INFINITY),
            ]
            .into_iter()
            .map(|(k, d)| KeyValue {
                key: k.into(),
                value: Some(double(d)),
            })
            .collect();
            let req = ExportLogsServiceRequest {
                resource_logs: vec![ResourceLogs {
                    resource: Some(Resource {
                        attributes: ["service.name", "tenant.id"]
                            .into_iter()
                            .map(|k| KeyValue {
                                key: k.into(),
                                value: Some(AnyValue {
                                    value: Some(any_value::Value::StringValue("s".into())),
                                }),
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    scope_logs: vec![ScopeLogs {
                        log_records: vec![LogRecord {
                            body: Some(double(f64::NAN)),
                            attributes,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    schema_url: String::new(),
                }],
            };
            let json = br#"{"resourceLogs":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"s"}},{"key":"tenant.id","value":{"stringValue":"s"}}]},"scopeLogs":[{"logRecords":[{"body":{"doubleValue":"NaN"},"attributes":[{"key":"nan","value":{"doubleValue":"NaN"}},{"key":"inf","value":{"doubleValue":"Infinity"}},{"key":"ninf","value":{"doubleValue":"-Infinity"}}]}]}]}]}"#;
            let from_proto = events(Encoding::Protobuf, &prost::Message::encode_to_vec(&req));
            let (accepted, _) = from_proto.clone().unwrap();
            assert_eq!(accepted.len(), 1);
            let text = String::from_utf8_lossy(&accepted[0]);
            assert!(
                text.contains(r#""message":"NaN""#)
                    && text.contains(
                        r#""attributes":{"nan":"NaN","inf":"Infinity","ninf":"-Infinity"}"#
                    ),
                "{text}"
            );
            assert_eq!(events(Encoding::Json, json), from_proto);
        }

        proptest! {
            #[test]
            fn protobuf_and_otlp_json_give_the_same_events(req in request()) {
                let json = serde_json::to_vec(&req).unwrap();
                let from_json = events(Encoding::Json, &json);
                prop_assert!(from_json.is_ok(), "{:?}: {}", from_json, String::from_utf8_lossy(&json));
                let from_proto = events(Encoding::Protobuf, &prost::Message::encode_to_vec(&req));
                prop_assert_eq!(&from_proto, &from_json, "{}", String::from_utf8_lossy(&json));
                // And the JSON decoder yields the very message protobuf does.
                let decoded = decode(Encoding::Json, &json, &Limits::default()).unwrap();
                prop_assert_eq!(decoded, req);
            }
        }
    }
}
