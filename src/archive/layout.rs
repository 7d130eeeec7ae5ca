//! Where lines go: the hourly file of an event (by its own UTC timestamp),
//! the summary of an hour, and the unparsed file of a record.
//!
//! Paths are relative to the archive directory and made from strftime
//! patterns. The defaults are the Log Pipeline's, so its readers keep
//! working: `logs/%Y-%m-%d/%H.log.json` and
//! `analytics/%Y-%m-%d/summary_%H.json`.

use std::path::{Component, Path, PathBuf};

use chrono::format::{Parsed, StrftimeItems};
use chrono::{DateTime, Utc};

/// Default pattern of the hourly files.
pub const DEFAULT_LOGS: &str = "logs/%Y-%m-%d/%H.log.json";
/// Default pattern of the hourly summaries.
pub const DEFAULT_SUMMARIES: &str = "analytics/%Y-%m-%d/summary_%H.json";
/// Unparsed records, by the hour they arrived (wall clock): they have no
/// usable event time of their own.
pub const UNPARSED: &str = "logs/unparsed/%Y-%m-%d/%H.json";

/// Earliest and latest archive time, ms since the epoch: years 0000 to
/// 9999 in UTC, the hours whose key (`%Y-%m-%dT%H`) and file names have four
/// year digits and parse back. An event time outside is unparsed.
pub const MIN_EVENT_MS: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
pub const MAX_EVENT_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z

/// An hour: whole hours since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hour(pub i64);

impl Hour {
    /// The hour holding `ms` milliseconds since the epoch.
    pub fn of_millis(ms: i64) -> Hour {
        Hour(ms.div_euclid(3_600_000))
    }

    /// Within years 0000 to 9999 in UTC: the only hours an archive names.
    pub fn in_range(self) -> bool {
        (Hour::of_millis(MIN_EVENT_MS).0..=Hour::of_millis(MAX_EVENT_MS).0).contains(&self.0)
    }

    pub fn now() -> Hour {
        Hour::of_millis(Utc::now().timestamp_millis())
    }

    fn start(self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.0.checked_mul(3600)?, 0)
    }

    /// `2026-11-26T12`, the form of the `hour` query parameter and the
    /// checkpoint's keys.
    pub fn key(self) -> String {
        match self.start() {
            Some(t) => t.format("%Y-%m-%dT%H").to_string(),
            None => format!("hour{}", self.0),
        }
    }

    /// Parses [`Hour::key`]'s form (`2026-11-26T12`, also `2026-11-26T12:00`).
    pub fn parse(s: &str) -> Option<Hour> {
        let s = s.trim();
        let head = s.get(..13)?;
        let tail = &s[13..];
        if !(tail.is_empty() || tail == ":00" || tail == ":00:00" || tail == ":00:00Z") {
            return None;
        }
        let t =
            chrono::NaiveDateTime::parse_from_str(&format!("{head}:00"), "%Y-%m-%dT%H:%M").ok()?;
        Some(Hour::of_millis(t.and_utc().timestamp_millis())).filter(|h| h.in_range())
    }

    fn format(self, pattern: &str) -> Option<String> {
        let t = self.start()?;
        let mut out = String::new();
        use std::fmt::Write;
        write!(out, "{}", t.format_with_items(StrftimeItems::new(pattern))).ok()?;
        Some(out)
    }
}

/// The file layout of one archive directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    logs: String,
    summaries: String,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            logs: DEFAULT_LOGS.into(),
            summaries: DEFAULT_SUMMARIES.into(),
        }
    }
}

impl Layout {
    /// Checks that both patterns are relative, stay inside the directory,
    /// give every hour its own path (they must name year, month, day and
    /// hour) and do not collide with each other or the unparsed files.
    pub fn new(logs: &str, summaries: &str) -> Result<Layout, String> {
        for (name, p) in [("logs", logs), ("summaries", summaries)] {
            let path = Path::new(p);
            if p.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(format!(
                    "archive {name} pattern {p:?} must be a relative path without `..`"
                ));
            }
            // The checkpoint's own directory: files there are removed at
            // open when no checkpoint names them.
            if path.components().next().map(|c| c.as_os_str())
                == Some(std::ffi::OsStr::new(super::checkpoint::HOURS_DIR))
            {
                return Err(format!(
                    "archive {name} pattern {p:?} must not be under {}/ (the checkpoint's)",
                    super::checkpoint::HOURS_DIR
                ));
            }
            // Distinct hours must map to distinct files (and parse back):
            // try neighbours in every field.
            let base = Hour(Hour::parse("2026-01-31T23").map_or(0, |h| h.0));
            let mut seen = std::collections::HashSet::new();
            for h in [0, 1, 24, 24 * 31, 24 * 366] {
                let hour = Hour(base.0 + h);
                let s = hour
                    .format(p)
                    .ok_or_else(|| format!("archive {name} pattern {p:?} is not strftime"))?;
                if !seen.insert(s.clone()) || parse_hour(p, &s) != Some(hour) {
                    return Err(format!(
                        "archive {name} pattern {p:?} must name the year, month, day and hour \
                         (%Y %m %d %H) so that every hour has its own file"
                    ));
                }
            }
        }
        let layout = Layout {
            logs: logs.into(),
            summaries: summaries.into(),
        };
        let h = Hour(0);
        let (l, s, u) = (layout.log(h), layout.summary(h), layout.unparsed(h));
        if l == s || l == u || s == u || parse_hour(UNPARSED, &layout.logs_str(h)).is_some() {
            return Err("archive logs, summaries and unparsed paths must differ".into());
        }
        Ok(layout)
    }

    fn logs_str(&self, h: Hour) -> String {
        h.format(&self.logs).unwrap_or_default()
    }

    /// The hourly file of events in hour `h`.
    pub fn log(&self, h: Hour) -> PathBuf {
        PathBuf::from(self.logs_str(h))
    }

    /// The summary of hour `h`.
    pub fn summary(&self, h: Hour) -> PathBuf {
        PathBuf::from(h.format(&self.summaries).unwrap_or_default())
    }

    /// The file of unparsed records that arrived in hour `h`.
    pub fn unparsed(&self, h: Hour) -> PathBuf {
        PathBuf::from(h.format(UNPARSED).unwrap_or_default())
    }

    /// What `rel` (relative to the directory) is in this layout, if anything.
    pub fn classify(&self, rel: &str) -> Option<(Kind, Hour)> {
        if let Some(h) = parse_hour(UNPARSED, rel) {
            return Some((Kind::Unparsed, h));
        }
        if let Some(h) = parse_hour(&self.logs, rel) {
            return Some((Kind::Log, h));
        }
        if let Some(h) = parse_hour(&format!("{}.zst", self.logs), rel) {
            return Some((Kind::Compressed, h));
        }
        parse_hour(&self.summaries, rel).map(|h| (Kind::Summary, h))
    }
}

/// The kinds of files an archive directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Log,
    Compressed,
    Summary,
    Unparsed,
}

/// The hour a path made from `pattern` names, if it was made from it.
fn parse_hour(pattern: &str, s: &str) -> Option<Hour> {
    let mut parsed = Parsed::new();
    chrono::format::parse(&mut parsed, s, StrftimeItems::new(pattern)).ok()?;
    parsed.set_minute(0).ok()?;
    let t = parsed
        .to_naive_date()
        .ok()?
        .and_time(parsed.to_naive_time().ok()?);
    let hour = Hour::of_millis(t.and_utc().timestamp_millis());
    // Round trip: refuses inputs the parser accepted loosely, and hours no
    // archive time can have (`logs/+10000-01-01/00.log.json`).
    (hour.in_range() && hour.format(pattern).as_deref() == Some(s)).then_some(hour)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_the_log_pipelines() {
        let l = Layout::default();
        let h = Hour::parse("2026-11-26T12").unwrap();
        assert_eq!(h.key(), "2026-11-26T12");
        assert_eq!(l.log(h), PathBuf::from("logs/2026-11-26/12.log.json"));
        assert_eq!(
            l.summary(h),
            PathBuf::from("analytics/2026-11-26/summary_12.json")
        );
        assert_eq!(
            l.classify("logs/2026-11-26/12.log.json"),
            Some((Kind::Log, h))
        );
        assert_eq!(
            l.classify("logs/unparsed/2026-11-26/12.json"),
            Some((Kind::Unparsed, h))
        );
        assert_eq!(
            l.classify("logs/2026-11-26/12.log.json.zst"),
            Some((Kind::Compressed, h))
        );
        assert_eq!(l.classify("logs/2026-11-26/notes.txt"), None);
        assert_eq!(Hour::of_millis(-1).key(), "1969-12-31T23");
        // Years 0000-9999 only: what a build without the range check wrote.
        assert_eq!(l.classify("logs/+10000-01-01/00.log.json"), None);
        assert_eq!(Hour::parse("+10000-01-01T00"), None);
        let last = Hour::of_millis(MAX_EVENT_MS);
        assert_eq!(Hour::parse(&last.key()), Some(last));
        assert_eq!(
            Hour::parse("0000-01-01T00"),
            Some(Hour::of_millis(MIN_EVENT_MS))
        );
    }

    #[test]
    fn patterns_that_merge_hours_or_escape_are_refused() {
        assert!(Layout::new("logs/%Y-%m-%d.json", DEFAULT_SUMMARIES).is_err());
        assert!(Layout::new("../logs/%Y/%m/%d/%H", DEFAULT_SUMMARIES).is_err());
        assert!(Layout::new("/abs/%Y/%m/%d/%H", DEFAULT_SUMMARIES).is_err());
        assert!(Layout::new(DEFAULT_LOGS, DEFAULT_LOGS).is_err());
        assert!(Layout::new("checkpoint.d/%Y/%m/%d/%H", DEFAULT_SUMMARIES).is_err());
        let l = Layout::new("events/%Y/%m/%d/%H.ndjson", DEFAULT_SUMMARIES).unwrap();
        let h = Hour::parse("2026-02-01T00").unwrap();
        assert_eq!(l.log(h), PathBuf::from("events/2026/02/01/00.ndjson"));
    }
}
