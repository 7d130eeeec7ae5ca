//! `[archive]`: settings of `sluice archive` (brokers and topic come from
//! `[kafka]`). Every field's doc ends with its default.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::analytics::AnalyticsSpec;
use super::layout::{Layout, DEFAULT_LOGS, DEFAULT_SUMMARIES};
use super::writer::WriterOptions;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ArchiveConfig {
    /// The archive directory (one per archiver). Default `./sluice-archive`.
    pub dir: PathBuf,
    /// Kafka consumer group. Default `sluice-archive`.
    pub group_id: String,
    /// HTTP listener: analytics, health, readiness, metrics. It has no
    /// keys and no TLS, and `/v1/analytics` shows the top values of the
    /// tracked fields of every tenant, so
    /// an address off loopback is refused unless `allow-non-loopback`.
    /// Default `127.0.0.1:9191`.
    pub listen: std::net::SocketAddr,
    /// Accept a non-loopback `listen` (logged at warn at every start): for
    /// a network where every client that reaches the port may read the
    /// analytics, or behind an authenticating proxy. Default false.
    pub allow_non_loopback: bool,
    /// Request headers must arrive within this many ms, else the
    /// connection is closed; it also bounds an idle keep-alive connection.
    /// Default 10000.
    pub header_timeout_ms: u64,
    /// Open connections on `listen` at most; past it, new connections are
    /// closed at once (`sluice_archive_http_connections_refused_total`).
    /// Keep it well below the process's open-file limit. Default 256.
    pub max_connections: usize,
    /// Static group membership: join the group with a
    /// `group.instance.id` read from `DIR/member-id` (created once, a
    /// UUID), so that an archiver restarted within `session.timeout.ms`
    /// takes its partitions back at once instead of waiting for the group
    /// to expire its previous incarnation. The price: a stopped archiver
    /// does not leave the group, and its partitions wait
    /// `session.timeout.ms` before another member gets them. A
    /// `group.instance.id` in `archive.librdkafka` wins. Default true.
    pub static_membership: bool,
    /// Commit (fsync, checkpoint, Kafka offsets) at least this often while
    /// records arrive, in ms. Default 1000.
    pub commit_interval_ms: u64,
    /// ... or after this many records, whichever comes first. Default 50000.
    pub commit_records: u64,
    /// Files open at once. Default 64.
    pub max_open_files: usize,
    /// Open hours (counts in memory and in the checkpoint) kept after a
    /// commit; beyond it the least recently written are sealed (summary
    /// durable, dropped from memory and the checkpoint; a late event reopens
    /// the hour). Far-past and far-future hours are sealed first. Bounds
    /// memory and the checkpoint whatever the spread of event times.
    /// Default 64.
    pub max_open_hours: usize,
    /// Per-file write buffer. Default 262144.
    pub buffer_bytes: usize,
    /// Close a file and seal its hour after this many seconds without a
    /// line. Default 300.
    pub idle_close_secs: u64,
    /// Path pattern of the hourly files (strftime, UTC). Default `logs/%Y-%m-%d/%H.log.json`.
    pub logs_pattern: String,
    /// Path pattern of the summaries. Default `analytics/%Y-%m-%d/summary_%H.json`.
    pub summaries_pattern: String,
    /// Event-time field (RFC 3339, or epoch seconds/milliseconds). Default `timestamp`.
    pub timestamp_field: String,
    /// Fields counted with top-N besides tenant, source and severity.
    /// Default `["path", "userAgent"]`.
    pub fields: Vec<String>,
    /// Values listed per field in a summary. Default 10.
    pub top_n: usize,
    /// Distinct values tracked per field per hour (the rest count as
    /// `other`). Default 1000.
    pub max_tracked: usize,
    /// Count URLs and paths with their query string and fragment
    /// (`/reset-password?token=...`). When false they are counted without
    /// them (`query_removed` in the summary says how many), so that a
    /// secret in a query string never reaches a summary, the checkpoint or
    /// `/v1/analytics`. Default false.
    pub keep_query_strings: bool,
    /// Delete hourly files older than this many days (summaries stay); 0
    /// keeps everything. Default 0.
    pub retention_days: u64,
    /// zstd-compress an hour's file (`HH.log.json.zst`) once it is sealed
    /// (idle `idle-close-secs`); summaries and analytics are unaffected, and
    /// a late event decompresses the hour first. Default false.
    pub compress: bool,
    /// What to do when a partition's offsets started over: the broker's log
    /// ends below the offset the archive reached, or the cluster id differs
    /// from the checkpoint's (another cluster, a recreated topic). `fail`
    /// refuses to archive the partition and exits non-zero with a message
    /// naming topic, partition, offsets and cluster ids; `restart` archives
    /// the new log from its beginning (the old files stay). Either way it
    /// is logged and counted (`sluice_archive_offset_resets_total`).
    /// Default `fail`.
    pub on_offset_reset: OnOffsetReset,
    /// librdkafka consumer properties on top of the archiver's own (e.g.
    /// `session.timeout.ms`); `security.*`, `sasl.*` and `ssl.*` from
    /// `[kafka.librdkafka]` are used too. `enable.auto.commit`,
    /// `enable.auto.offset.store`, `group.id` and `auto.offset.reset` are
    /// the archiver's and cannot be set here; incremental (cooperative)
    /// rebalancing (`partition.assignment.strategy = cooperative-sticky`,
    /// `group.protocol = consumer`) is refused. Default empty.
    pub librdkafka: std::collections::BTreeMap<String, String>,
}

/// `archive.on-offset-reset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnOffsetReset {
    /// Refuse to archive the partition: exit non-zero, naming it.
    #[default]
    Fail,
    /// Forget the partition's old position and archive the new log from
    /// its beginning.
    Restart,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        let spec = AnalyticsSpec::default();
        ArchiveConfig {
            dir: PathBuf::from("sluice-archive"),
            group_id: "sluice-archive".into(),
            listen: ([127, 0, 0, 1], 9191).into(),
            allow_non_loopback: false,
            header_timeout_ms: 10_000,
            max_connections: 256,
            static_membership: true,
            commit_interval_ms: 1000,
            commit_records: 50_000,
            max_open_files: 64,
            max_open_hours: 64,
            buffer_bytes: 256 << 10,
            idle_close_secs: 300,
            logs_pattern: DEFAULT_LOGS.into(),
            summaries_pattern: DEFAULT_SUMMARIES.into(),
            timestamp_field: "timestamp".into(),
            fields: spec.fields,
            top_n: spec.top_n,
            max_tracked: spec.max_tracked,
            keep_query_strings: spec.keep_query_strings,
            retention_days: 0,
            compress: false,
            on_offset_reset: OnOffsetReset::Fail,
            librdkafka: Default::default(),
        }
    }
}

impl ArchiveConfig {
    pub fn validate(&self) -> Result<(), String> {
        Layout::new(&self.logs_pattern, &self.summaries_pattern)?;
        if self.group_id.is_empty() {
            return Err("archive.group-id must not be empty".into());
        }
        if self.commit_interval_ms == 0 || self.commit_records == 0 {
            return Err("archive.commit-interval-ms and archive.commit-records must be > 0".into());
        }
        if self.max_open_files == 0 || self.max_tracked == 0 || self.max_open_hours == 0 {
            return Err(
                "archive.max-open-files, archive.max-open-hours and archive.max-tracked must be > 0"
                    .into(),
            );
        }
        for k in ["enable.auto.commit", "enable.auto.offset.store", "group.id"] {
            if self.librdkafka.contains_key(k) {
                return Err(format!("archive.librdkafka.{k}: cannot be set, offsets move only after the files are durable"));
            }
        }
        if self.librdkafka.contains_key("auto.offset.reset") {
            return Err("archive.librdkafka.auto.offset.reset: cannot be set, an offset out of range is an offset reset, handled by archive.on-offset-reset".into());
        }
        // The rebalance callback assigns and revokes eagerly: every
        // partition is committed and given up, then the new set assigned.
        // Incremental protocols call it with deltas, which it would take
        // for the whole assignment.
        if let Some(v) = self.librdkafka.get("partition.assignment.strategy") {
            if v.to_ascii_lowercase().contains("cooperative") {
                return Err(format!("archive.librdkafka.partition.assignment.strategy = {v:?}: incremental (cooperative) rebalancing is not supported by sluice archive; use \"range\" or \"roundrobin\""));
            }
        }
        if let Some(v) = self.librdkafka.get("group.protocol") {
            if !v.eq_ignore_ascii_case("classic") {
                return Err(format!("archive.librdkafka.group.protocol = {v:?}: sluice archive supports only the \"classic\" group protocol (\"consumer\", KIP-848, rebalances incrementally)"));
            }
        }
        if self.header_timeout_ms == 0 || self.max_connections == 0 {
            return Err("archive.header-timeout-ms and archive.max-connections must be > 0".into());
        }
        Ok(())
    }

    /// `sluice archive` only (the files sink has no listener, and `serve`
    /// must not refuse a setting it does not use): a `listen` off loopback
    /// needs `allow-non-loopback`.
    pub fn validate_listener(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            return Err(format!(
                "archive.listen {} is not a loopback address: the archive listener has no keys and no TLS, and /v1/analytics shows the top values of the tracked fields of every tenant; listen on 127.0.0.1 (behind an authenticating proxy if it must be reached from elsewhere), or set archive.allow-non-loopback = true (docs/security.md)",
                self.listen
            ));
        }
        Ok(())
    }

    /// The settings naming event fields, with their keys, for the field-name
    /// rule `Config::validate` applies to every such setting
    /// (the ingest config module's `check_field_name`).
    pub fn field_names(&self) -> impl Iterator<Item = (&'static str, &str)> {
        std::iter::once(("archive.timestamp-field", self.timestamp_field.as_str()))
            .chain(self.fields.iter().map(|f| ("archive.fields", f.as_str())))
    }

    /// The writer's options (after [`ArchiveConfig::validate`]).
    pub fn writer_options(&self) -> Result<WriterOptions, String> {
        let mut o = WriterOptions::new(&self.dir);
        o.layout = Layout::new(&self.logs_pattern, &self.summaries_pattern)?;
        o.analytics.fields = self.fields.clone();
        o.analytics.top_n = self.top_n;
        o.analytics.max_tracked = self.max_tracked;
        o.analytics.keep_query_strings = self.keep_query_strings;
        o.timestamp_field = self.timestamp_field.clone();
        o.max_open_files = self.max_open_files;
        o.max_open_hours = self.max_open_hours;
        o.buffer_bytes = self.buffer_bytes;
        o.idle_close = Duration::from_secs(self.idle_close_secs);
        o.compress_sealed = self.compress;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::{ArchiveConfig, OnOffsetReset};

    #[test]
    fn on_offset_reset_parses_and_consumer_settings_it_owns_are_refused() {
        let c: ArchiveConfig = toml::from_str("on-offset-reset = \"restart\"\n").unwrap();
        assert_eq!(c.on_offset_reset, OnOffsetReset::Restart);
        assert_eq!(
            ArchiveConfig::default().on_offset_reset,
            OnOffsetReset::Fail
        );
        assert!(toml::from_str::<ArchiveConfig>("on-offset-reset = \"skip\"\n").is_err());
        for (k, v, want) in [
            ("auto.offset.reset", "latest", "archive.on-offset-reset"),
            (
                "partition.assignment.strategy",
                "range,cooperative-sticky",
                "not supported",
            ),
            ("group.protocol", "consumer", "classic"),
        ] {
            let mut a = ArchiveConfig::default();
            a.librdkafka.insert(k.into(), v.into());
            let err = a.validate().unwrap_err();
            assert!(err.contains(k) && err.contains(want), "{err}");
        }
        let mut a = ArchiveConfig::default();
        a.librdkafka
            .insert("partition.assignment.strategy".into(), "roundrobin".into());
        a.librdkafka
            .insert("group.protocol".into(), "classic".into());
        a.validate().unwrap();
    }

    #[test]
    fn a_non_loopback_listener_needs_allow_non_loopback() {
        let mut a = ArchiveConfig {
            listen: "0.0.0.0:9191".parse().unwrap(),
            ..Default::default()
        };
        a.validate().unwrap();
        let err = a.validate_listener().unwrap_err();
        assert!(err.contains("archive.allow-non-loopback"), "{err}");
        a.allow_non_loopback = true;
        a.validate_listener().unwrap();
        a.listen = "[::1]:9191".parse().unwrap();
        a.allow_non_loopback = false;
        a.validate_listener().unwrap();
    }
}
