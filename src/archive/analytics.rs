//! Hourly analytics, counted as lines are written (never by re-reading a
//! file): the total, counts by tenant, source and severity, configured
//! fields with top-N, and the first and last event time.
//!
//! Memory per hour is bounded: each dimension tracks at most `max_tracked`
//! distinct values; once full, lines with a value not yet tracked are
//! counted in that dimension's `other`. `total` and every dimension's
//! `sum(counts) + other + missing` are always exact.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
        }
    }
}

/// Counts of one dimension in one hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counter {
    pub counts: BTreeMap<String, u64>,
    /// Lines whose value was not tracked because `max_tracked` was reached.
    pub other: u64,
    /// Lines without this field.
    pub missing: u64,
}

impl Counter {
    fn add(&mut self, value: Option<String>, cap: usize) {
        match value {
            None => self.missing += 1,
            Some(v) => {
                if let Some(c) = self.counts.get_mut(&v) {
                    *c += 1;
                } else if self.counts.len() < cap {
                    self.counts.insert(v, 1);
                } else {
                    self.other += 1;
                }
            }
        }
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

/// A value as a count key: strings as they are, other JSON as its text.
fn key(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn lookup<'a>(event: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = event.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(event, |v, part| v.get(part))
}

impl HourStats {
    /// Counts one line of `bytes` bytes (newline included).
    pub fn add(&mut self, spec: &AnalyticsSpec, event: &Value, ts_ms: i64, bytes: u64) {
        self.total += 1;
        self.bytes += bytes;
        self.first_ms = Some(self.first_ms.map_or(ts_ms, |f| f.min(ts_ms)));
        self.last_ms = Some(self.last_ms.map_or(ts_ms, |l| l.max(ts_ms)));
        let cap = spec.max_tracked;
        let get = |f: &str| lookup(event, f).and_then(key);
        self.by_tenant.add(get(&spec.tenant_field), cap);
        self.by_source.add(get(&spec.source_field), cap);
        self.by_severity.add(get(&spec.severity_field), cap);
        for f in &spec.fields {
            self.fields.entry(f.clone()).or_default().add(get(f), cap);
        }
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
}
