//! Validating and normalizing one event, and building the Kafka record it
//! becomes. Each event is judged alone.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{Map, Value};

use crate::auth::TenantScope;
use crate::config::{EventsConfig, Limits};
use crate::wal::Record;

/// Kafka header names set at ingest. The replayer adds `seq`.
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
}

impl EventError {
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::Malformed(_) => "malformed",
            EventError::NotObject => "not_object",
            EventError::Missing(_) => "missing_field",
            EventError::Invalid(_) => "invalid_field",
            EventError::TooLarge { .. } => "too_large",
            EventError::TooDeep(_) => "too_deep",
            EventError::Forbidden(_) => "forbidden",
        }
    }
}

/// An event ready for the WAL.
#[derive(Debug, Clone)]
pub struct NormalizedEvent {
    pub id: String,
    pub tenant: Option<String>,
    /// The encoded [`Record`]: the WAL payload and the Kafka record.
    pub payload: Vec<u8>,
}

pub struct Normalizer {
    limits: Limits,
    events: EventsConfig,
}

impl Normalizer {
    pub fn new(limits: Limits, events: EventsConfig) -> Self {
        Normalizer { limits, events }
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

    /// Normalizes an event for a request whose key grants `scope`. A key
    /// bound to one tenant fills in a missing `tenant_id`; any other tenant
    /// (or none, for a key bound to several) is refused.
    pub fn normalize_for(
        &self,
        value: Value,
        received_at: DateTime<Utc>,
        scope: &TenantScope,
    ) -> Result<NormalizedEvent, EventError> {
        let Value::Object(mut input) = value else {
            return Err(EventError::NotObject);
        };
        if depth(&input, 1) > self.limits.max_depth {
            return Err(EventError::TooDeep(self.limits.max_depth));
        }
        if let Some(t) = scope.implied() {
            if matches!(input.get("tenant_id"), None | Some(Value::Null)) {
                input.insert("tenant_id".into(), Value::String(t.to_string()));
            }
        }
        for field in &self.events.required {
            match input.get(field) {
                None | Some(Value::Null) => return Err(EventError::Missing(field.clone())),
                Some(Value::String(s)) if s.trim().is_empty() => {
                    return Err(EventError::Invalid(format!("{field} is empty")))
                }
                _ => {}
            }
        }
        let l = &self.limits;

        let id = match input.shift_remove("id") {
            None | Some(Value::Null) => uuid::Uuid::now_v7().to_string(),
            Some(Value::String(s)) => {
                let n = s.chars().count();
                if n == 0 || n > l.max_id_chars {
                    return Err(invalid(format!(
                        "id must be 1 to {} characters",
                        l.max_id_chars
                    )));
                }
                s
            }
            Some(_) => return Err(invalid("id must be a string")),
        };
        let tenant = match input.shift_remove("tenant_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if valid_tenant(&s) => Some(s),
            Some(_) => return Err(invalid("tenant_id must match [A-Za-z0-9._-]{1,64}")),
        };
        scope
            .check(tenant.as_deref())
            .map_err(EventError::Forbidden)?;
        let timestamp = match input.shift_remove("timestamp") {
            None | Some(Value::Null) => received_at,
            Some(v) => parse_timestamp(&v)?,
        };
        let severity = match input.shift_remove("severity") {
            None | Some(Value::Null) => "INFO",
            Some(Value::String(s)) => normalize_severity(&s).ok_or_else(|| {
                invalid("severity must be one of TRACE, DEBUG, INFO, WARN, WARNING, ERROR, FATAL")
            })?,
            Some(_) => return Err(invalid("severity must be a string")),
        };
        let source = match input.shift_remove("source") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                let s = s.trim().to_lowercase();
                if s.chars().count() > l.max_source_chars {
                    return Err(invalid(format!(
                        "source is longer than {} characters",
                        l.max_source_chars
                    )));
                }
                Some(s)
            }
            Some(_) => return Err(invalid("source must be a string")),
        };
        let message = match input.shift_remove("message") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.trim().to_string()),
            Some(_) => return Err(invalid("message must be a string")),
        };
        let metadata = match input.shift_remove("metadata") {
            None | Some(Value::Null) => None,
            Some(m @ Value::Object(_)) => Some(m),
            Some(_) => return Err(invalid("metadata must be an object")),
        };

        // Known fields first in a fixed order, then unknown ones verbatim in
        // the order the client sent them. Written straight to bytes: the
        // same output as collecting a `Map` and serializing it (the known
        // keys were removed from `input`, so no key repeats), without a
        // second hash map per event.
        let ts = timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let key = match self.events.key_field.as_str() {
            "id" => Some(id.as_bytes().to_vec()),
            "tenant_id" => tenant.as_ref().map(|t| t.as_bytes().to_vec()),
            "timestamp" => Some(ts.as_bytes().to_vec()),
            "severity" => Some(severity.as_bytes().to_vec()),
            "source" => source.as_ref().map(|s| s.as_bytes().to_vec()),
            "message" => message.as_ref().map(|m| m.as_bytes().to_vec()),
            "metadata" => metadata.as_ref().map(|m| m.to_string().into_bytes()),
            other => match input.get(other) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.as_bytes().to_vec()),
                Some(v) => Some(v.to_string().into_bytes()),
            },
        };
        let mut out = JsonObject::with_capacity(256);
        out.field("id", &id)?;
        if let Some(t) = &tenant {
            out.field("tenant_id", t)?;
        }
        out.field("timestamp", &ts)?;
        out.field("severity", severity)?;
        if let Some(s) = &source {
            out.field("source", s)?;
        }
        if let Some(m) = &message {
            out.field("message", m)?;
        }
        if let Some(m) = &metadata {
            out.field("metadata", m)?;
        }
        for (k, v) in &input {
            out.field(k, v)?;
        }
        let value = out.finish();
        if value.len() > l.max_event_bytes {
            return Err(EventError::TooLarge {
                size: value.len(),
                limit: l.max_event_bytes,
            });
        }
        let mut headers = vec![(HEADER_ID.to_string(), id.clone().into_bytes())];
        if let Some(t) = &tenant {
            headers.push((HEADER_TENANT.to_string(), t.clone().into_bytes()));
        }
        headers.push((
            HEADER_RECEIVED_AT.to_string(),
            received_at
                .to_rfc3339_opts(SecondsFormat::Millis, true)
                .into_bytes(),
        ));
        let record = Record {
            key,
            value,
            headers,
            timestamp_ms: timestamp.timestamp_millis(),
        };
        Ok(NormalizedEvent {
            id,
            tenant,
            payload: record.encode(),
        })
    }
}

/// A JSON object written field by field into one buffer.
struct JsonObject {
    buf: Vec<u8>,
}

impl JsonObject {
    fn with_capacity(n: usize) -> Self {
        let mut buf = Vec::with_capacity(n);
        buf.push(b'{');
        JsonObject { buf }
    }

    fn field<V: serde::Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &V,
    ) -> Result<(), EventError> {
        if self.buf.len() > 1 {
            self.buf.push(b',');
        }
        let malformed = |e: serde_json::Error| EventError::Malformed(e.to_string());
        serde_json::to_writer(&mut self.buf, key).map_err(malformed)?;
        self.buf.push(b':');
        serde_json::to_writer(&mut self.buf, value).map_err(malformed)
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.push(b'}');
        self.buf
    }
}

fn invalid(msg: impl Into<String>) -> EventError {
    EventError::Invalid(msg.into())
}

/// `[A-Za-z0-9._-]{1,64}`, ASCII only: a look-alike from another script is
/// refused, never folded.
pub fn valid_tenant(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn normalize_severity(s: &str) -> Option<&'static str> {
    Some(match s.trim().to_ascii_uppercase().as_str() {
        "TRACE" => "TRACE",
        "DEBUG" => "DEBUG",
        "INFO" => "INFO",
        "WARN" | "WARNING" => "WARN",
        "ERROR" => "ERROR",
        "FATAL" => "FATAL",
        _ => return None,
    })
}

/// RFC 3339 (any offset), or epoch seconds or milliseconds as a number or a
/// numeric string; the result is UTC.
fn parse_timestamp(v: &Value) -> Result<DateTime<Utc>, EventError> {
    let bad = || {
        invalid("timestamp must be RFC 3339 (e.g. 2024-05-01T12:00:00Z) or epoch seconds or milliseconds")
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
        // Years 0..=9999 only: RFC 3339 cannot express more.
        if !(-62_167_219_200_000.0..=253_402_300_799_999.0).contains(&ms) {
            return Err(invalid("timestamp is out of range (years 0 to 9999)"));
        }
        Utc.timestamp_millis_opt(ms.round() as i64)
            .single()
            .ok_or_else(bad)
    };
    match v {
        Value::Number(n) => epoch(n.as_f64().ok_or_else(bad)?),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
                return Ok(dt.with_timezone(&Utc));
            }
            match s.parse::<f64>() {
                Ok(n)
                    if s.bytes()
                        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-') =>
                {
                    epoch(n)
                }
                _ => Err(bad()),
            }
        }
        _ => Err(bad()),
    }
}

/// Nesting depth, counting the event object as 1. Iterative, so a deep value
/// cannot overflow the stack here (serde_json already caps parsing at 128).
fn depth(obj: &Map<String, Value>, base: usize) -> usize {
    let mut max = base;
    let mut stack: Vec<(&Value, usize)> = obj.values().map(|v| (v, base + 1)).collect();
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Object(m) => {
                max = max.max(d);
                stack.extend(m.values().map(|c| (c, d + 1)));
            }
            Value::Array(a) => {
                max = max.max(d);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    max
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
