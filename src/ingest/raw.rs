//! JSON read without building a value tree. A body is split into the raw text
//! of each event (borrowed from the body), and an event into the raw text of
//! each top-level field. Nested values are never materialized: they are
//! checked for depth and written out compact by one iterative scan. So memory
//! per request is the body plus a few words per event and per field, whatever
//! the body's shape, and no depth can overflow a stack or serde_json's
//! recursion limit (its `ignore_value`, used to capture raw text, is
//! iterative).

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::value::RawValue;

/// Compact length and container depth of valid JSON text (a scalar is depth
/// 0, `[]` is 1), writing the compact form to `out` when given. The text must
/// already have been validated by serde_json; whitespace outside strings is
/// dropped and everything else is copied byte for byte, so numbers and string
/// escapes stay exactly as the client wrote them.
pub fn compact(raw: &str, mut out: Option<&mut Vec<u8>>) -> (usize, usize) {
    let (mut len, mut depth, mut max) = (0usize, 0usize, 0usize);
    let (mut in_str, mut escaped) = (false, false);
    for &b in raw.as_bytes() {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => continue,
                b'"' => in_str = true,
                b'[' | b'{' => {
                    depth += 1;
                    max = max.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        len += 1;
        if let Some(o) = out.as_deref_mut() {
            o.push(b);
        }
    }
    (len, max)
}

/// The top-level fields of one event object, in body order (duplicates
/// included), or why there are none.
pub enum Fields<'a> {
    Object(Vec<(Cow<'a, str>, &'a RawValue)>),
    /// More than the allowed number of fields: the rest was skipped unread.
    TooMany,
}

/// Splits the text of a JSON object into its fields, stopping after
/// `max_fields` (the rest is skipped without allocating).
pub fn fields(text: &str, max_fields: usize) -> Result<Fields<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let f = de.deserialize_map(FieldsVisitor { max_fields })?;
    de.end()?;
    Ok(f)
}

struct FieldsVisitor {
    max_fields: usize,
}

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key_seed(KeySeed)? {
            if out.len() == self.max_fields {
                map.next_value::<IgnoredAny>()?;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(Fields::TooMany);
            }
            let v: &'de RawValue = map.next_value()?;
            out.push((k, v));
        }
        Ok(Fields::Object(out))
    }
}

/// A key, borrowed from the body when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Whether the first key of a JSON object's text (valid JSON, starting with
/// `{`) could be one of `names`: false only when it is plainly another key
/// (or there is none). A key with an escape may spell anything, so it answers
/// true and the caller reads the object properly.
pub fn first_key_may_be(text: &str, names: &[&str]) -> bool {
    let rest = text[1..].trim_start_matches([' ', '\t', '\n', '\r']);
    let Some(rest) = rest.strip_prefix('"') else {
        return false;
    };
    match rest.find(['"', '\\']) {
        Some(end) if rest.as_bytes()[end] == b'"' => names.contains(&&rest[..end]),
        _ => true,
    }
}

/// Why a JSON array of events was not split.
pub enum SplitError {
    TooMany,
    Json(serde_json::Error),
}

/// The raw text of each element of a JSON array, refusing more than `max`
/// elements as soon as the one past it starts: a body of millions of tiny
/// elements costs no more than one at the limit.
pub fn elements(text: &str, max: usize) -> Result<Vec<&RawValue>, SplitError> {
    let too_many = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let r = de
        .deserialize_seq(ElementsVisitor {
            max,
            too_many: &too_many,
        })
        .and_then(|v| de.end().map(|()| v));
    match r {
        Ok(v) => Ok(v),
        Err(_) if too_many.get() => Err(SplitError::TooMany),
        Err(e) => Err(SplitError::Json(e)),
    }
}

struct ElementsVisitor<'c> {
    max: usize,
    too_many: &'c Cell<bool>,
}

impl<'de> Visitor<'de> for ElementsVisitor<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<&'de RawValue>()? {
            if out.len() == self.max {
                self.too_many.set(true);
                return Err(de::Error::custom("too many events"));
            }
            out.push(v);
        }
        Ok(out)
    }
}

/// A JSON string's value, `None` for `null`, `Err(())` for any other type.
/// Borrowed from the text when the string has no escape, as most do: an
/// event's known fields then cost no allocation to read.
pub fn string(raw: &RawValue) -> Result<Option<Cow<'_, str>>, ()> {
    let t = raw.get();
    if t == "null" {
        Ok(None)
    } else if t.starts_with('"') {
        // Valid JSON (serde_json produced the raw value): a string without
        // a backslash is its own text between the quotes.
        match t.get(1..t.len() - 1) {
            Some(inner) if t.len() >= 2 && !inner.contains('\\') => Ok(Some(Cow::Borrowed(inner))),
            _ => serde_json::from_str::<String>(t)
                .map(|s| Some(Cow::Owned(s)))
                .map_err(|_| ()),
        }
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_strings_and_numbers_and_counts_depth() {
        let mut out = Vec::new();
        let (len, depth) = compact("{ \"a b\" : [ 1e5 , \"x \\\" ]\" , { } ] }", Some(&mut out));
        assert_eq!(out, br#"{"a b":[1e5,"x \" ]",{}]}"#);
        assert_eq!((len, depth), (out.len(), 3));
        assert_eq!(compact("7", None), (1, 0));
    }

    #[test]
    fn first_key_is_read_only_when_plain() {
        let names = ["event", "events"];
        for (text, may) in [
            (r#"{"event":{}}"#, true),
            (" {\n \"events\" :[]}".trim_start(), true),
            (r#"{"tenant_id":"a","event":1}"#, false),
            (r#"{"ev\u0065nt":{}}"#, true),
            (r#"{"eventually":1}"#, false),
            ("{ }", false),
        ] {
            assert_eq!(first_key_may_be(text, &names), may, "{text}");
        }
    }

    #[test]
    fn elements_stop_at_the_limit() {
        let body = format!("[{}0]", "0,".repeat(100));
        assert!(matches!(elements(&body, 100), Err(SplitError::TooMany)));
        assert_eq!(elements(&body, 101).ok().map(|v| v.len()), Some(101));
    }

    #[test]
    fn fields_stop_at_the_limit_and_borrow_keys() {
        match fields(r#"{"a":1,"b\n":[2],"a":3}"#, 10).unwrap() {
            Fields::Object(f) => {
                assert_eq!(f.len(), 3);
                assert!(matches!(f[0].0, Cow::Borrowed("a")));
                assert_eq!(f[1].0, "b\n");
                assert_eq!(f[1].1.get(), "[2]");
            }
            Fields::TooMany => panic!(),
        }
        assert!(matches!(
            fields(r#"{"a":1,"b":2,"c":{"d":1}}"#, 2).unwrap(),
            Fields::TooMany
        ));
    }
}
