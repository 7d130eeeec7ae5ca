//! Hourly analytics, counted as lines are written (never by re-reading a
//! file): the total, counts by tenant, source and severity, configured
//! fields with top-N, and the first and last event time.
//!
//! Memory per hour is bounded: each dimension tracks at most `max_tracked`
//! distinct values; once full, lines with a value not yet tracked are
//! counted in that dimension's `other`. `total` and every dimension's
//! `sum(counts) + other + missing` are always exact.
//!
//! Each tracked value is at most [`MAX_VALUE_BYTES`] bytes: a longer one is
//! cut at a character boundary and marked with [`CUT_MARK`] (counted in the
//! dimension's `cut`). So an hour's counts take at most
//! `dimensions x max_tracked x (MAX_VALUE_BYTES + mark)` bytes of keys,
//! whatever the events hold (issue 26 item 1: one tenant's 900 KB `path`
//! values grew the checkpoint to 288 MB).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bytes of a tracked value kept before it is cut (UTF-8, at a character
/// boundary). Also applied to values read back from a checkpoint or a
/// summary written before the cap existed.
pub const MAX_VALUE_BYTES: usize = 256;
/// Appended to a value cut at [`MAX_VALUE_BYTES`].
pub const CUT_MARK: &str = "…[cut]";

/// What to count, shared by every hour.
#[derive(Debug, Clone)]
pub struct AnalyticsSpec {
    /// Field holding the tenant. `tenant_id` (sluice's normalized events).
    pub tenant_field: String,
    /// Field holding the source. `source`.
    pub source_field: String,
    /// Field holding the severity. `severity`.
    pub severity_field: String,
    /// Extra fields counted with top-N (dotted paths reach into objects).
    pub fields: Vec<String>,
    /// How many values a summary lists per extra field.
    pub top_n: usize,
    /// Distinct values tracked per dimension per hour; the rest go to `other`.
    pub max_tracked: usize,
    /// Keep the query string and fragment of values that are URLs or
    /// paths (`/reset-password?token=...`). Default false: they are
    /// removed before counting, so secrets in query strings never reach a
    /// summary, the checkpoint or `/v1/analytics` (issue 26 item 5).
    pub keep_query_strings: bool,
}

impl Default for AnalyticsSpec {
    fn default() -> Self {
        AnalyticsSpec {
            tenant_field: "tenant_id".into(),
            source_field: "source".into(),
            severity_field: "severity".into(),
            fields: vec!["path".into(), "userAgent".into()],
            top_n: 10,
            max_tracked: 1000,
            keep_query_strings: false,
        }
    }
}

/// Counts of one dimension in one hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counter {
    /// Values (cut to [`MAX_VALUE_BYTES`], marked) and their lines. Keys
    /// longer than that in an older checkpoint or summary are cut while
    /// they are read, one at a time, and merged.
    #[serde(deserialize_with = "cut_keys")]
    pub counts: BTreeMap<String, u64>,
    /// Lines whose value was not tracked because `max_tracked` was reached.
    pub other: u64,
    /// Lines without this field.
    pub missing: u64,
    /// Lines whose value was longer than [`MAX_VALUE_BYTES`] and was
    /// counted under its cut, marked form.
    #[serde(skip_serializing_if = "is_zero")]
    pub cut: u64,
    /// Lines whose value was a URL or path with a query string or
    /// fragment, counted without it (unless `keep_query_strings`).
    #[serde(skip_serializing_if = "is_zero")]
    pub query_removed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `s` cut to at most [`MAX_VALUE_BYTES`] (at a character boundary) and
/// marked with [`CUT_MARK`], or `s` itself when it fits.
pub fn cut_value(s: &str) -> (String, bool) {
    if s.len() <= MAX_VALUE_BYTES {
        return (s.to_string(), false);
    }
    let mut end = MAX_VALUE_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (format!("{}{CUT_MARK}", &s[..end]), true)
}

/// `s` with the query string (and fragment) of every URL-like word
/// removed; `None` when there is nothing to remove. A word (split at ASCII
/// whitespace, which is kept) loses everything from its first `?` or `#`
/// when it is URL-shaped (a `/` before that mark: `/reset?token=`,
/// `www.example.com/r?t=`, `https://h/p#f`), and from its first `?` when
/// what follows holds a `=` (`reset-password?token=x`). So a request line
/// (`GET /r?token=x HTTP/1.1`) keeps its method and version, and text
/// whose `?` ends a question (`why? a=b` splits at the space) is left
/// alone.
pub fn without_query(s: &str) -> Option<String> {
    fn cut(word: &str) -> Option<usize> {
        let mark = word.find(['?', '#'])?;
        if word[..mark].contains('/') {
            return Some(mark);
        }
        let q = word.find('?')?;
        word[q + 1..].contains('=').then_some(q)
    }
    let mut out: Option<String> = None;
    let mut at = 0;
    for (i, word) in s
        .split(|c: char| c.is_ascii_whitespace())
        .scan(0usize, |pos, w| {
            let start = *pos;
            *pos += w.len() + 1;
            Some((start, w))
        })
    {
        if let Some(c) = cut(word) {
            let o = out.get_or_insert_with(|| String::with_capacity(s.len()));
            o.push_str(&s[at..i + c]);
            at = i + word.len();
        }
    }
    out.map(|mut o| {
        o.push_str(&s[at..]);
        o
    })
}

/// Deserializes a count map cutting every key as it arrives, so that an
/// older checkpoint's huge values are never all in memory at once.
fn cut_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u64>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = BTreeMap<String, u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of values to counts")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, n)) = m.next_entry::<String, u64>()? {
                let c: &mut u64 = out.entry(cut_value(&k).0).or_default();
                *c = c.saturating_add(n);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

/// A `fmt::Write`/`io::Write` sink that keeps the first bytes and then
/// fails, so that serializing a huge non-string value stops early.
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let room = (MAX_VALUE_BYTES + 4).saturating_sub(self.0.len());
        if room == 0 {
            return Err(std::io::Error::other("full"));
        }
        let n = b.len().min(room);
        self.0.extend_from_slice(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Counter {
    /// Counts one line; returns whether its value was cut.
    fn add(&mut self, value: Option<Key>, cap: usize) -> bool {
        let cut = value.as_ref().is_some_and(|v| v.cut);
        if cut {
            self.cut += 1;
        }
        if value.as_ref().is_some_and(|v| v.query_removed) {
            self.query_removed += 1;
        }
        match value {
            None => self.missing += 1,
            Some(Key { value: v, .. }) => {
                if let Some(c) = self.counts.get_mut(&v) {
                    *c += 1;
                } else if self.counts.len() < cap {
                    self.counts.insert(v, 1);
                } else {
                    self.other += 1;
                }
            }
        }
        cut
    }

    /// The `n` largest counts, ties by value.
    pub fn top(&self, n: usize) -> Vec<TopEntry> {
        let mut v: Vec<_> = self.counts.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.into_iter()
            .take(n)
            .map(|(value, &count)| TopEntry {
                value: value.clone(),
                count,
            })
            .collect()
    }

    fn merge(&mut self, o: &Counter) {
        for (k, v) in &o.counts {
            *self.counts.entry(k.clone()).or_insert(0) += v;
        }
        self.other += o.other;
        self.missing += o.missing;
        self.cut += o.cut;
        self.query_removed += o.query_removed;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopEntry {
    pub value: String,
    pub count: u64,
}

/// The analytics of one hour, as kept in the checkpoint and the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HourStats {
    /// Lines in the hour's file.
    pub total: u64,
    /// Bytes of the hour's file (the durable length when saved).
    pub bytes: u64,
    /// Earliest and latest event time, milliseconds since the epoch.
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    pub by_tenant: Counter,
    pub by_source: Counter,
    pub by_severity: Counter,
    pub fields: BTreeMap<String, Counter>,
}

/// A value as counted.
struct Key {
    value: String,
    /// Cut to [`MAX_VALUE_BYTES`].
    cut: bool,
    /// A query string or fragment was removed ([`without_query`]).
    query_removed: bool,
}

/// A value as a count key: strings as they are (without the query string
/// of a path or URL unless `keep_query`), other JSON as its text; cut to
/// [`MAX_VALUE_BYTES`]. Only the first bytes of a long value are ever
/// copied.
fn key(v: &Value, keep_query: bool) -> Option<Key> {
    let (value, cut, query_removed) = match v {
        Value::Null => return None,
        Value::String(s) => {
            let stripped = if keep_query { None } else { without_query(s) };
            let (value, cut) = cut_value(stripped.as_deref().unwrap_or(s));
            (value, cut, stripped.is_some())
        }
        other => {
            let mut w = Bounded(Vec::new());
            // Fails once MAX_VALUE_BYTES + 4 bytes are in: then the text is
            // longer than the cap and cut_value marks it.
            let _ = serde_json::to_writer(&mut w, other);
            let text = match String::from_utf8(w.0) {
                Ok(t) => t,
                Err(e) => {
                    let valid = e.utf8_error().valid_up_to();
                    let mut b = e.into_bytes();
                    b.truncate(valid);
                    String::from_utf8(b).unwrap_or_default()
                }
            };
            // An array or object holding a URL: its text, queries removed.
            let stripped = if keep_query {
                None
            } else {
                without_query(&text)
            };
            let (value, cut) = cut_value(stripped.as_deref().unwrap_or(&text));
            (value, cut, stripped.is_some())
        }
    };
    Some(Key {
        value,
        cut,
        query_removed,
    })
}

fn lookup<'a>(event: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = event.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(event, |v, part| v.get(part))
}

impl HourStats {
    /// Counts one line of `bytes` bytes (newline included); returns how
    /// many of its values were cut to [`MAX_VALUE_BYTES`].
    pub fn add(&mut self, spec: &AnalyticsSpec, event: &Value, ts_ms: i64, bytes: u64) -> u64 {
        self.total += 1;
        self.bytes += bytes;
        self.first_ms = Some(self.first_ms.map_or(ts_ms, |f| f.min(ts_ms)));
        self.last_ms = Some(self.last_ms.map_or(ts_ms, |l| l.max(ts_ms)));
        let cap = spec.max_tracked;
        let get = |f: &str| lookup(event, f).and_then(|v| key(v, spec.keep_query_strings));
        let mut cut = u64::from(self.by_tenant.add(get(&spec.tenant_field), cap));
        cut += u64::from(self.by_source.add(get(&spec.source_field), cap));
        cut += u64::from(self.by_severity.add(get(&spec.severity_field), cap));
        for f in &spec.fields {
            cut += u64::from(self.fields.entry(f.clone()).or_default().add(get(f), cap));
        }
        cut
    }

    /// The summary document of this hour.
    pub fn summary(&self, hour_key: &str, file: &str, top_n: usize) -> Summary {
        Summary {
            hour: hour_key.to_string(),
            file: file.to_string(),
            top: self
                .fields
                .iter()
                .map(|(k, c)| (k.clone(), c.top(top_n)))
                .collect(),
            first_event: self.first_ms.and_then(rfc3339),
            last_event: self.last_ms.and_then(rfc3339),
            stats: self.clone(),
        }
    }

    /// Adds `o` to `self` (for range queries).
    pub fn merge(&mut self, o: &HourStats) {
        self.total += o.total;
        self.bytes += o.bytes;
        self.first_ms = match (self.first_ms, o.first_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_ms = match (self.last_ms, o.last_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.by_tenant.merge(&o.by_tenant);
        self.by_source.merge(&o.by_source);
        self.by_severity.merge(&o.by_severity);
        for (k, c) in &o.fields {
            self.fields.entry(k.clone()).or_default().merge(c);
        }
    }
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// `analytics/YYYY-MM-DD/summary_HH.json`: the hour's counts, its top-N
/// lists, and (in `stats`) everything needed to continue counting when a
/// late event reopens the hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub hour: String,
    /// The hourly file, relative to the archive directory.
    pub file: String,
    pub first_event: Option<String>,
    pub last_event: Option<String>,
    /// Top-N values of each configured field.
    pub top: BTreeMap<String, Vec<TopEntry>>,
    #[serde(flatten)]
    pub stats: HourStats,
}

/// Per-hour analytics in memory, keyed by hour.
pub type Hours = HashMap<super::layout::Hour, HourStats>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_are_exact_and_bounded() {
        let spec = AnalyticsSpec {
            max_tracked: 2,
            ..Default::default()
        };
        let mut h = HourStats::default();
        for (i, p) in ["/a", "/b", "/a", "/c", "/d"].iter().enumerate() {
            let e = json!({"tenant_id": "t", "path": p, "severity": "INFO",
                           "request": {"path": p}});
            h.add(&spec, &e, 1000 + i as i64, 10);
        }
        h.add(&spec, &json!({"tenant_id": "u"}), 5, 3);
        assert_eq!(h.total, 6);
        assert_eq!(h.bytes, 53);
        assert_eq!((h.first_ms, h.last_ms), (Some(5), Some(1004)));
        let p = &h.fields["path"];
        assert_eq!(
            p.counts,
            BTreeMap::from([("/a".into(), 2), ("/b".into(), 1)])
        );
        assert_eq!((p.other, p.missing), (2, 1));
        assert_eq!(
            p.top(1),
            vec![TopEntry {
                value: "/a".into(),
                count: 2
            }]
        );
        assert_eq!(h.by_tenant.counts["t"], 5);
        assert_eq!(h.by_severity.missing, 1);
        let s = h.summary("2026-11-26T12", "logs/x", 10);
        let back: Summary = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back.stats, h);
    }

    #[test]
    fn query_strings_of_url_like_words_only() {
        let w = |s: &str| without_query(s);
        let some = |s: &str| Some(s.to_string());
        assert_eq!(w("/a?token=x"), some("/a"));
        assert_eq!(w("/a#frag"), some("/a"));
        assert_eq!(w("https://h/p?q#f"), some("https://h/p"));
        assert_eq!(w("svc+http://h?x"), some("svc+http://h"));
        assert_eq!(w(" /reset?token=x"), some(" /reset"));
        assert_eq!(w("\t/x?token=y"), some("\t/x"));
        assert_eq!(w("reset-password?token=s"), some("reset-password"));
        assert_eq!(
            w("www.example.com/reset?token=s"),
            some("www.example.com/reset")
        );
        assert_eq!(
            w("GET /reset-password?token=s HTTP/1.1"),
            some("GET /reset-password HTTP/1.1")
        );
        assert_eq!(w("http:/x?token=s"), some("http:/x"));
        assert_eq!(w("a /b?c=d e /f#g"), some("a /b e /f"));
        assert_eq!(w("/a"), None);
        assert_eq!(w("why?"), None);
        assert_eq!(w("why? a=b"), None);
        assert_eq!(w("not a url?SECRETX"), None);
        assert_eq!(w("é/ü?x=1 ü"), some("é/ü ü"));
    }
}
