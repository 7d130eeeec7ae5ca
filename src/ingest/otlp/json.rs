//! OTLP/JSON into the prost types, by the OTLP/JSON rules (the OTLP
//! specification, "JSON Protobuf Encoding", on top of proto3's JSON
//! mapping):
//!
//! - field names in lowerCamelCase, and the proto names (`time_unix_nano`)
//!   too, as every proto3 JSON parser accepts both;
//! - 64-bit integers (`timeUnixNano`, `intValue`) as strings or numbers, and
//!   32-bit ones as numbers or strings; an integral number in exponent form
//!   (`1e3`) is an integer;
//! - enums (`severityNumber`) as integers or by name
//!   (`SEVERITY_NUMBER_ERROR`);
//! - `traceId`/`spanId` as hex (either case), not base64; `bytesValue` as
//!   base64 (standard or URL-safe, padded or not);
//! - `doubleValue` as a number, or the strings `"NaN"`, `"Infinity"`,
//!   `"-Infinity"`, or a number in a string;
//! - `null` for any field is that field's default; unknown fields are
//!   ignored (the spec: receivers MUST ignore them); an empty `AnyValue`
//!   (`{}`) is an empty value.
//!
//! Why not opentelemetry-proto's own `Deserialize`: its `AnyValue` is a
//! `#[serde(flatten)]` field, which buffers the value through serde's
//! content tree; with serde_json's `arbitrary_precision` (which sluice
//! needs to keep event numbers exact) a buffered non-integer arrives as a
//! map, so any `doubleValue` like 637.704 failed the whole body ("invalid
//! type: map, expected f64"). It also refuses numeric `timeUnixNano`,
//! named enums, `"NaN"` and `{}`. The crate's `Serialize` is still the
//! reference the property test encodes with.
//!
//! Everything streams from the body: no intermediate JSON tree, and scalars
//! are read as borrowed raw text, so numbers are parsed from their exact
//! digits whatever serde_json's features.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The error text of a body with more log records than allowed.
pub const TOO_MANY_RECORDS: &str = "more log records than the request limit";

thread_local! {
    /// Log records the body being read may still hold (see [`decode`]).
    static RECORDS_LEFT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Decodes a whole OTLP/JSON `ExportLogsServiceRequest` (trailing
/// whitespace only after it), refusing the record past `max_records` as it
/// is read: a log record is the large message, so a body of 640,000 `{}`
/// records must not be decoded first and counted after (it took serve to
/// 326 MB).
pub fn decode(
    body: &[u8],
    max_records: usize,
) -> Result<ExportLogsServiceRequest, serde_json::Error> {
    RECORDS_LEFT.with(|c| c.set(max_records));
    let mut de = serde_json::Deserializer::from_slice(body);
    let request = Message::<ExportLogsServiceRequest>::deserialize(&mut de);
    RECORDS_LEFT.with(|c| c.set(usize::MAX));
    let request = request?.0;
    de.end()?;
    Ok(request)
}

/// A protobuf message read from a JSON object, field by field.
trait Fields: Default {
    /// Whether a message of this type counts against the record limit.
    const IS_RECORD: bool = false;

    /// Reads the value of field `name` from `map` into `self`; `false` when
    /// the name is not a field (the caller skips the value).
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error>;
}

struct Message<T>(T);

impl<'de, T: Fields> Deserialize<'de> for Message<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Fields> Visitor<'de> for V<T> {
            type Value = Message<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object (an OTLP message)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<T>, A::Error> {
                if T::IS_RECORD {
                    let left = RECORDS_LEFT.with(|c| c.get());
                    if left == 0 {
                        return Err(de::Error::custom(TOO_MANY_RECORDS));
                    }
                    RECORDS_LEFT.with(|c| c.set(left - 1));
                }
                let mut m = T::default();
                while let Some(Key(name)) = map.next_key::<Key<'de>>()? {
                    if !m.field(&name, &mut map)? {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Message(m))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// A field name, borrowed from the body unless it has escapes (serde's own
/// `Cow<str>` always copies).
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A message field: `null` or absent is `None`.
fn message<'de, A: MapAccess<'de>, T: Fields>(map: &mut A) -> Result<Option<T>, A::Error> {
    Ok(map.next_value::<Option<Message<T>>>()?.map(|m| m.0))
}

/// A repeated message field, read straight into its Vec.
struct Messages<T>(Vec<T>);

impl<'de, T: Fields> Deserialize<'de> for Messages<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Fields> Visitor<'de> for V<T> {
            type Value = Messages<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON array of OTLP messages")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Messages<T>, A::Error> {
                // No size hint from JSON; never trust one anyway.
                let mut out = Vec::new();
                while let Some(Message(m)) = seq.next_element::<Message<T>>()? {
                    out.push(m);
                }
                Ok(Messages(out))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// A repeated message field: `null` is empty.
fn messages<'de, A: MapAccess<'de>, T: Fields>(map: &mut A) -> Result<Vec<T>, A::Error> {
    Ok(map
        .next_value::<Option<Messages<T>>>()?
        .map_or_else(Vec::new, |m| m.0))
}

fn string<'de, A: MapAccess<'de>>(map: &mut A) -> Result<String, A::Error> {
    Ok(map.next_value::<Option<String>>()?.unwrap_or_default())
}

fn strings<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Vec<String>, A::Error> {
    Ok(map.next_value::<Option<Vec<String>>>()?.unwrap_or_default())
}

/// A scalar's text: a string's contents (unescaped) or a number's digits;
/// `None` for `null`. `quoted` tells which.
fn scalar<'de, A: MapAccess<'de>, T>(
    map: &mut A,
    name: &str,
    parse: impl FnOnce(&str, bool) -> Option<T>,
) -> Result<Option<T>, A::Error> {
    let raw: &'de RawValue = map.next_value()?;
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    let (text, quoted): (Cow<str>, bool) = if let Some(inner) = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|t| !t.contains('\\'))
    {
        // No escapes: the text between the quotes is the string.
        (inner.into(), true)
    } else if text.starts_with('"') {
        (
            serde_json::from_str::<String>(text)
                .map_err(de::Error::custom)?
                .into(),
            true,
        )
    } else {
        (text.into(), false)
    };
    match parse(&text, quoted) {
        Some(v) => Ok(Some(v)),
        None => Err(de::Error::custom(format_args!(
            "{name}: {text:?} is not a valid value"
        ))),
    }
}

/// An integer in proto3 JSON: digits, or an integral number in any JSON
/// form (`1e3`, `5.0`) as long as it is exact.
fn integer<T: TryFrom<i128>>(text: &str) -> Option<T> {
    let text = text.trim();
    if let Ok(i) = text.parse::<i128>() {
        return T::try_from(i).ok();
    }
    let f = text.parse::<f64>().ok()?;
    // 2^53: above it an f64 no longer holds every integer.
    (f.is_finite() && f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0)
        .then(|| T::try_from(f as i128).ok())
        .flatten()
}

fn int<'de, A: MapAccess<'de>, T: TryFrom<i128> + Default>(
    map: &mut A,
    name: &str,
) -> Result<T, A::Error> {
    Ok(scalar(map, name, |t, _| integer(t))?.unwrap_or_default())
}

/// A double: a JSON number, or a string holding one or `NaN`, `Infinity`,
/// `-Infinity`. A number too large for f64 is refused, not made infinite.
fn double(text: &str, quoted: bool) -> Option<f64> {
    match text {
        "NaN" if quoted => Some(f64::NAN),
        "Infinity" if quoted => Some(f64::INFINITY),
        "-Infinity" if quoted => Some(f64::NEG_INFINITY),
        _ => text.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
    }
}

/// An enum: its number, or its name.
fn severity_number(text: &str, quoted: bool) -> Option<i32> {
    integer(text).or_else(|| {
        quoted
            .then(|| SeverityNumber::from_str_name(text).map(|s| s as i32))
            .flatten()
    })
}

/// `traceId`/`spanId`: hex, as the OTLP spec requires instead of base64.
fn hex_bytes<'de, A: MapAccess<'de>>(map: &mut A, name: &str) -> Result<Vec<u8>, A::Error> {
    Ok(scalar(map, name, |t, quoted| {
        quoted.then(|| hex::decode(t).ok()).flatten()
    })?
    .unwrap_or_default())
}

/// `bytesValue`: base64, standard or URL-safe, padded or not.
fn base64_bytes(text: &str, quoted: bool) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    if !quoted {
        return None;
    }
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(text).ok())
}

impl Fields for ExportLogsServiceRequest {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "resourceLogs" | "resource_logs" => self.resource_logs = messages(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for ResourceLogs {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "resource" => self.resource = message(map)?,
            "scopeLogs" | "scope_logs" => self.scope_logs = messages(map)?,
            "schemaUrl" | "schema_url" => self.schema_url = string(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for Resource {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "attributes" => self.attributes = messages(map)?,
            "droppedAttributesCount" | "dropped_attributes_count" => {
                self.dropped_attributes_count = int(map, name)?
            }
            "entityRefs" | "entity_refs" => self.entity_refs = messages(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for EntityRef {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "schemaUrl" | "schema_url" => self.schema_url = string(map)?,
            "type" => self.r#type = string(map)?,
            "idKeys" | "id_keys" => self.id_keys = strings(map)?,
            "descriptionKeys" | "description_keys" => self.description_keys = strings(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for ScopeLogs {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "scope" => self.scope = message(map)?,
            "logRecords" | "log_records" => self.log_records = messages(map)?,
            "schemaUrl" | "schema_url" => self.schema_url = string(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for InstrumentationScope {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "name" => self.name = string(map)?,
            "version" => self.version = string(map)?,
            "attributes" => self.attributes = messages(map)?,
            "droppedAttributesCount" | "dropped_attributes_count" => {
                self.dropped_attributes_count = int(map, name)?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for LogRecord {
    const IS_RECORD: bool = true;

    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "timeUnixNano" | "time_unix_nano" => self.time_unix_nano = int(map, name)?,
            "observedTimeUnixNano" | "observed_time_unix_nano" => {
                self.observed_time_unix_nano = int(map, name)?
            }
            "severityNumber" | "severity_number" => {
                self.severity_number = scalar(map, name, severity_number)?.unwrap_or_default()
            }
            "severityText" | "severity_text" => self.severity_text = string(map)?,
            "body" => self.body = message(map)?,
            "attributes" => self.attributes = messages(map)?,
            "droppedAttributesCount" | "dropped_attributes_count" => {
                self.dropped_attributes_count = int(map, name)?
            }
            "flags" => self.flags = int(map, name)?,
            "traceId" | "trace_id" => self.trace_id = hex_bytes(map, name)?,
            "spanId" | "span_id" => self.span_id = hex_bytes(map, name)?,
            "eventName" | "event_name" => self.event_name = string(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for KeyValue {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "key" => self.key = string(map)?,
            "value" => self.value = message(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for AnyValue {
    /// One of the value fields; `null` leaves the value as it was, and
    /// when several are present the last one wins (as protobuf's oneof).
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        use any_value::Value as V;
        let value = match name {
            "stringValue" | "string_value" => {
                map.next_value::<Option<String>>()?.map(V::StringValue)
            }
            "boolValue" | "bool_value" => map.next_value::<Option<bool>>()?.map(V::BoolValue),
            "intValue" | "int_value" => scalar(map, name, |t, _| integer(t))?.map(V::IntValue),
            "doubleValue" | "double_value" => scalar(map, name, double)?.map(V::DoubleValue),
            "arrayValue" | "array_value" => message::<A, ArrayValue>(map)?.map(V::ArrayValue),
            "kvlistValue" | "kvlist_value" => message::<A, KeyValueList>(map)?.map(V::KvlistValue),
            "bytesValue" | "bytes_value" => scalar(map, name, base64_bytes)?.map(V::BytesValue),
            _ => return Ok(false),
        };
        if value.is_some() {
            self.value = value;
        }
        Ok(true)
    }
}

impl Fields for ArrayValue {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "values" => self.values = messages(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Fields for KeyValueList {
    fn field<'de, A: MapAccess<'de>>(&mut self, name: &str, map: &mut A) -> Result<bool, A::Error> {
        match name {
            "values" => self.values = messages(map)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_every_proto3_form() {
        assert_eq!(integer::<u64>("18446744073709551615"), Some(u64::MAX));
        assert_eq!(integer::<i64>("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(integer::<u64>("1e3"), Some(1000));
        assert_eq!(integer::<u32>("5.0"), Some(5));
        assert_eq!(integer::<u32>("5.5"), None);
        assert_eq!(integer::<u32>("-1"), None);
        assert_eq!(integer::<u64>("1e30"), None, "not exact");
        assert_eq!(integer::<i32>("x"), None);
    }

    #[test]
    fn doubles_and_their_names() {
        assert_eq!(double("637.704", false), Some(637.704));
        assert_eq!(double("2.5", true), Some(2.5));
        assert!(double("NaN", true).unwrap().is_nan());
        assert_eq!(double("-Infinity", true), Some(f64::NEG_INFINITY));
        assert_eq!(double("inf", true), None);
        assert_eq!(double("1e999", false), None);
    }

    /// Issue 26 item 8: the reader before this one (7f2e9fe) was a
    /// `#[derive(Deserialize)]` struct with one defaulted field, which serde
    /// also reads from a JSON array (its fields in order), so `[]` was an
    /// empty request (200, nothing stored). OTLP/JSON is an object.
    #[test]
    fn a_request_is_an_object_not_an_array() {
        for bad in ["[]", "[[]]", "null", "0", "\"\""] {
            let e = decode(bad.as_bytes(), usize::MAX).unwrap_err().to_string();
            assert!(e.contains("a JSON object"), "{bad}: {e}");
        }
        assert_eq!(
            decode(b"{}", usize::MAX).unwrap(),
            ExportLogsServiceRequest::default()
        );
    }
}
