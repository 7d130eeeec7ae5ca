//! Named streams: which routes feed which topic, under which schema.
//!
//! A stream is a name, the ingest paths it serves, its topic and dead-letter
//! topic, the fields its events must carry, its key field and, optionally,
//! the tenants it takes. The `default` stream always exists: it is built from
//! `[events]` and `[kafka]` (so `SLUICE_TOPIC`, `SLUICE_EVENTS_REQUIRED` and
//! the flags keep addressing it) and serves every built-in ingest path that
//! no `[[streams]]` entry claims. `[[streams]]` entries are file-only.
//!
//! Each WAL record carries its stream's name, so replay produces it to that
//! stream's topic whatever the configuration order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth::rates::StreamRates;
use crate::ingest::config::{EventsConfig, Limits};
use crate::ingest::Normalizer;
use crate::replay::{KafkaConfig, StreamTopics};
use crate::wal::DEFAULT_STREAM;

/// The built-in ingest paths: the canonical one and the aliases for clients
/// of older gateways. The default stream serves those no stream claims.
pub const INGEST_PATHS: [&str; 4] = ["/v1/events", "/ingest", "/events", "/logs"];

/// OTLP/HTTP logs (`ExportLogsServiceRequest`), OTLP's default path. Like
/// the ingest paths it belongs to the stream that claims it, else to the
/// default stream; its body is OTLP rather than JSON/NDJSON/CSV.
pub const OTLP_LOGS_PATH: &str = "/v1/logs";

/// Paths a stream may not claim: the status endpoints.
const RESERVED_PATHS: [&str; 5] = ["/stats", "/metrics", "/health", "/ready", "/v1/receipts"];

/// Streams at most: each is a label value of the `stream` metrics.
pub const MAX_STREAMS: usize = 64;

/// One `[[streams]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StreamConfig {
    /// `[a-z0-9_-]{1,64}`; written into every WAL record of the stream.
    /// `default` is the built-in stream and cannot be redefined.
    pub name: String,
    /// Ingest paths (`/events`) this stream serves. At least one.
    pub routes: Vec<String>,
    /// Kafka topic of its events.
    pub topic: String,
    /// Kafka topic of the records its topic refuses.
    pub dead_letter_topic: String,
    /// Fields every event must carry. Default: none.
    #[serde(default)]
    pub required: Vec<String>,
    /// Top-level field used as the Kafka key. Default `tenant_id` (no key
    /// when an event has none).
    #[serde(default = "default_key_field")]
    pub key_field: String,
    /// Tenants this stream takes; an event naming another tenant, or none,
    /// is refused (403 when all are). Empty: any tenant, or none.
    #[serde(default)]
    pub allowed_tenants: Vec<String>,
    /// Adds `"success": true|false` (true when nothing was rejected) to the
    /// ingest response, for clients of gateways that answered with it.
    /// Default false.
    #[serde(default)]
    pub response_success_field: bool,
    /// Extra severity names this stream's clients send, each mapped to a
    /// built-in level, e.g. `{ CRITICAL = "FATAL" }`. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub severity_aliases: BTreeMap<String, String>,
    /// Requests per second on this stream, across keys and tenants; past it,
    /// 429 with Retry-After. Default 0 (no limit).
    #[serde(default)]
    pub requests_per_sec: u32,
    /// Bucket size for `requests-per-sec`. Default 0 (= the rate).
    #[serde(default)]
    pub requests_burst: u32,
    /// Events per second on this stream. Default 0 (no limit).
    #[serde(default)]
    pub events_per_sec: u32,
    /// Bucket size for `events-per-sec`; a batch above it gets 413. Default
    /// 0 (= the rate).
    #[serde(default)]
    pub events_burst: u32,
}

fn default_key_field() -> String {
    "tenant_id".into()
}

impl StreamConfig {
    /// A stream on `routes` to `topic` (dead letters to `TOPIC-dlq`) with
    /// every optional setting at its default.
    pub fn new(name: &str, routes: &[&str], topic: &str) -> StreamConfig {
        StreamConfig {
            name: name.into(),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            topic: topic.into(),
            dead_letter_topic: format!("{topic}-dlq"),
            required: Vec::new(),
            key_field: default_key_field(),
            allowed_tenants: Vec::new(),
            response_success_field: false,
            severity_aliases: BTreeMap::new(),
            requests_per_sec: 0,
            requests_burst: 0,
            events_per_sec: 0,
            events_burst: 0,
        }
    }

    /// The stream's schema, as `[events]` gives the default stream's.
    fn events(&self) -> EventsConfig {
        EventsConfig {
            required: self.required.clone(),
            key_field: self.key_field.clone(),
        }
    }
}

/// A stream resolved for serving: its schema (a normalizer) and topics.
#[derive(Debug)]
pub struct Stream {
    pub name: String,
    pub routes: Vec<String>,
    pub topic: String,
    pub dead_letter_topic: String,
    pub key_field: String,
    pub normalizer: Normalizer,
    /// Index in [`Streams::all`], for per-stream counters.
    pub index: usize,
    /// Whether responses carry `success` (see [`StreamConfig`]).
    pub response_success_field: bool,
    /// The stream's own rate limits (none for the default stream, which
    /// `[rates]` covers).
    pub rates: StreamRates,
}

/// Every stream, in configuration order (the default one first).
#[derive(Debug, Clone)]
pub struct Streams {
    all: Vec<Arc<Stream>>,
}

impl Streams {
    /// Resolves the configured streams (the default one first). Call after
    /// [`validate`] succeeded.
    pub fn resolve(
        limits: &Limits,
        events: &EventsConfig,
        kafka: &KafkaConfig,
        streams: &[StreamConfig],
    ) -> Streams {
        let claimed: BTreeSet<&str> = streams
            .iter()
            .flat_map(|s| s.routes.iter().map(String::as_str))
            .collect();
        let default_routes: Vec<String> = INGEST_PATHS
            .iter()
            .chain(std::iter::once(&OTLP_LOGS_PATH))
            .filter(|p| !claimed.contains(**p))
            .map(|p| p.to_string())
            .collect();
        let mut all = vec![Arc::new(Stream {
            name: DEFAULT_STREAM.to_string(),
            routes: default_routes,
            topic: kafka.topic.clone(),
            dead_letter_topic: kafka.dead_letter_topic.clone(),
            key_field: events.key_field.clone(),
            normalizer: Normalizer::new(limits.clone(), events.clone()),
            index: 0,
            response_success_field: false,
            rates: StreamRates::new((0, 0), (0, 0)),
        })];
        for (i, s) in streams.iter().enumerate() {
            let normalizer = Normalizer::new(limits.clone(), s.events())
                .for_stream(&s.name, &s.allowed_tenants)
                .with_severity_aliases(&s.severity_aliases)
                .expect("validate checked the aliases");
            all.push(Arc::new(Stream {
                name: s.name.clone(),
                routes: s.routes.clone(),
                topic: s.topic.clone(),
                dead_letter_topic: s.dead_letter_topic.clone(),
                key_field: s.key_field.clone(),
                normalizer,
                index: i + 1,
                response_success_field: s.response_success_field,
                rates: StreamRates::new(
                    (s.requests_per_sec, s.requests_burst),
                    (s.events_per_sec, s.events_burst),
                ),
            }));
        }
        Streams { all }
    }

    /// Only the default stream: `[events]` and `[kafka]` as they are.
    pub fn default_only(limits: &Limits, events: &EventsConfig, kafka: &KafkaConfig) -> Streams {
        Streams::resolve(limits, events, kafka, &[])
    }

    pub fn all(&self) -> &[Arc<Stream>] {
        &self.all
    }

    /// Every route with its stream, for the router.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &Arc<Stream>)> {
        self.all
            .iter()
            .flat_map(|s| s.routes.iter().map(move |r| (r.as_str(), s)))
    }

    /// The topics replay needs, by stream name.
    pub fn topics(&self) -> StreamTopics {
        let mut t = StreamTopics::default();
        for s in &self.all {
            t.insert(&s.name, &s.topic, &s.dead_letter_topic);
        }
        t
    }
}

/// The name rule: short, and safe as a metric label and a log field.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A topic name Kafka accepts: `[a-zA-Z0-9._-]{1,249}`, not `.` or `..`.
pub fn check_topic(what: &str, topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 {
        return Err(format!(
            "{what} {topic:?}: a Kafka topic name has 1 to 249 characters"
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("{what} {topic:?}: Kafka refuses \".\" and \"..\""));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {topic:?}: Kafka refuses the character {c:?} (allowed: a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok(())
}

/// The longest route a stream may claim.
pub const MAX_ROUTE_BYTES: usize = 256;

/// The route rule, so that a route serves requests exactly as written:
/// `/`, or `/` then segments separated by single `/` (a trailing `/` is
/// allowed), each segment made of RFC 3986 unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`), not `.` or `..`, at most [`MAX_ROUTE_BYTES`].
/// Routes are matched as sent, not percent-decoded. So the router never
/// reads a route as a parameter or wildcard (`:id`, `{id}`, `*rest`) or
/// refuses it (it panics on a segment starting with `:` or `*`), and no route
/// is one clients cannot send as written: they percent-encode non-ASCII and
/// spaces and remove dot segments; proxies merge `//`. The error says
/// what is wrong with the route (the caller names it and the setting).
pub fn check_route(route: &str) -> Result<(), String> {
    if !route.starts_with('/') {
        return Err("must start with /".into());
    }
    if route.len() > MAX_ROUTE_BYTES {
        return Err(format!("is longer than {MAX_ROUTE_BYTES} bytes"));
    }
    if let Some(c) = route
        .chars()
        .find(|&c| !(c == '/' || c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')))
    {
        let why = match c {
            ':' | '*' | '{' | '}' => "the router reads it as a path parameter or wildcard",
            '%' => "routes are matched as sent, not percent-decoded",
            '?' | '#' => "it ends the path",
            _ => "clients percent-encode it, so the route would never match",
        };
        return Err(format!(
            "has the character {c:?} ({why}); a route is made of A-Z a-z 0-9 - . _ ~ and /"
        ));
    }
    if route.len() > 1 {
        let body = route.strip_suffix('/').unwrap_or(route);
        for segment in body[1..].split('/') {
            match segment {
                "" => {
                    return Err(
                        "has an empty segment (//); proxies merge it, so the route would not match"
                            .into(),
                    )
                }
                "." | ".." => {
                    return Err(format!(
                        "has the dot segment {segment:?}; clients remove it, so the route would never match"
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Refuses streams that cannot work: a bad or duplicate name, a route
/// breaking [`check_route`], claimed twice or reserved, a field name
/// breaking [`crate::ingest::config::check_field_name`], a severity alias of
/// a built-in name, a topic Kafka would refuse, a stream whose
/// topic is another stream's dead-letter topic.
pub fn validate(kafka: &KafkaConfig, streams: &[StreamConfig]) -> Result<(), String> {
    check_topic("kafka.topic", &kafka.topic)?;
    check_topic("kafka.dead-letter-topic", &kafka.dead_letter_topic)?;
    if streams.len() + 1 > MAX_STREAMS {
        return Err(format!(
            "streams: at most {} besides the default one",
            MAX_STREAMS - 1
        ));
    }
    let mut names = BTreeSet::new();
    let mut routes = BTreeMap::<&str, &str>::new();
    let mut topics = vec![(kafka.topic.as_str(), kafka.dead_letter_topic.as_str())];
    for s in streams {
        let n = &s.name;
        if !valid_name(n) {
            return Err(format!("streams: name {n:?} must match [a-z0-9_-]{{1,64}}"));
        }
        if n == DEFAULT_STREAM {
            return Err(format!(
                "streams: {n:?} is the built-in stream; set it with [events] and [kafka]"
            ));
        }
        if !names.insert(n.as_str()) {
            return Err(format!("streams.{n}.name: two streams are named {n:?}"));
        }
        if s.routes.is_empty() {
            return Err(format!("streams.{n}.routes: must name at least one path"));
        }
        for r in &s.routes {
            check_route(r).map_err(|e| format!("streams.{n}.routes: {r:?} {e}"))?;
            if RESERVED_PATHS
                .iter()
                .any(|p| r == p || r.starts_with(&format!("{p}/")))
            {
                return Err(format!(
                    "streams.{n}.routes: {r:?} is reserved for a status endpoint ({})",
                    RESERVED_PATHS.join(", ")
                ));
            }
            match routes.insert(r, n) {
                Some(other) if other == n => {
                    return Err(format!("streams.{n}.routes: {r:?} is listed twice"))
                }
                Some(other) => {
                    return Err(format!(
                        "streams.{n}.routes: {r:?} is claimed by both {other:?} and {n:?}"
                    ))
                }
                None => {}
            }
        }
        check_topic(&format!("streams.{n}.topic"), &s.topic)?;
        check_topic(
            &format!("streams.{n}.dead-letter-topic"),
            &s.dead_letter_topic,
        )?;
        if s.topic == s.dead_letter_topic {
            return Err(format!(
                "streams.{n}.dead-letter-topic: must differ from topic"
            ));
        }
        s.events().check(&format!("streams.{n}"))?;
        for t in &s.allowed_tenants {
            if !crate::tenant::TenantId::is_valid(t) {
                return Err(format!(
                    "streams.{n}.allowed-tenants: {t:?} must match [A-Za-z0-9._-]{{1,64}}"
                ));
            }
        }
        Normalizer::new(Limits::default(), EventsConfig::default())
            .with_severity_aliases(&s.severity_aliases)
            .map_err(|e| format!("streams.{n}.severity-aliases: {e}"))?;
        topics.push((s.topic.as_str(), s.dead_letter_topic.as_str()));
    }
    // A record dead-lettered by one stream must not read as an event of
    // another.
    for (i, (_, dlq)) in topics.iter().enumerate() {
        for (j, (topic, _)) in topics.iter().enumerate() {
            if i != j && dlq == topic {
                return Err(format!(
                    "streams: topic {topic:?} is both a stream's topic and another's dead-letter topic"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str, routes: &[&str], topic: &str) -> StreamConfig {
        StreamConfig::new(name, routes, topic)
    }

    #[test]
    fn kafka_topic_rules() {
        for ok in ["events", "a.b_c-D9", &"x".repeat(249)] {
            check_topic("t", ok).unwrap();
        }
        for bad in ["", ".", "..", "a b", "a/b", "é", &"x".repeat(250), "a:b"] {
            assert!(check_topic("t", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn conflicts_are_refused_with_what_conflicts() {
        let k = KafkaConfig::default();
        validate(
            &k,
            &[stream("a", &["/a"], "ta"), stream("b", &["/b"], "tb")],
        )
        .unwrap();
        let err = |s: &[StreamConfig]| validate(&k, s).unwrap_err();
        let e = err(&[stream("a", &["/x"], "ta"), stream("b", &["/x"], "tb")]);
        assert!(e.contains("\"/x\"") && e.contains("claimed by both"), "{e}");
        let e = err(&[stream("a", &["/x"], "ta"), stream("a", &["/y"], "tb")]);
        assert!(e.contains("two streams are named \"a\""), "{e}");
        let e = err(&[stream("a", &["/x"], "bad topic")]);
        assert!(e.contains("streams.a.topic"), "{e}");
        let e = err(&[stream("a", &["/x"], "..")]);
        assert!(e.contains("streams.a.topic"), "{e}");
        let e = err(&[stream("default", &["/x"], "t")]);
        assert!(e.contains("built-in"), "{e}");
        let e = err(&[stream("a", &["/metrics"], "t")]);
        assert!(e.contains("reserved"), "{e}");
        // OTLP's path is a route like the others: a stream may claim it.
        validate(&k, &[stream("a", &["/v1/logs"], "t")]).unwrap();
        let e = err(&[stream("A b", &["/x"], "t")]);
        assert!(e.contains("name"), "{e}");
        let e = err(&[stream("a", &[], "t")]);
        assert!(e.contains("at least one"), "{e}");
        let mut alias = stream("a", &["/x"], "t");
        alias
            .severity_aliases
            .insert("CRITICAL".into(), "SEVERE".into());
        let e = err(&[alias]);
        assert!(e.contains("streams.a") && e.contains("SEVERE"), "{e}");
        let mut dlq_clash = stream("a", &["/x"], "t");
        dlq_clash.dead_letter_topic = "events".into();
        let e = err(&[dlq_clash]);
        assert!(e.contains("dead-letter"), "{e}");
        let mut k2 = k.clone();
        k2.topic = "a b".into();
        assert!(validate(&k2, &[]).unwrap_err().contains("kafka.topic"));
    }

    #[test]
    fn route_rule_takes_plain_paths_only() {
        for ok in ["/", "/a", "/a/", "/v2/Events_x-y.z~", "/a.b/..c/d..", "/~"] {
            check_route(ok).unwrap();
        }
        for (bad, why) in [
            ("", "start with /"),
            ("a", "start with /"),
            ("/:id", "parameter"),
            ("/a:b", "parameter"),
            ("/{id}", "parameter"),
            ("/{{x}}", "parameter"),
            ("/*", "wildcard"),
            ("/ünï", "percent-encode"),
            ("/a b", "percent-encode"),
            ("/a%20", "percent-decoded"),
            ("/a?b", "ends the path"),
            ("//", "empty segment"),
            ("/a//b", "empty segment"),
            ("/.", "dot segment"),
            ("/a/../", "dot segment"),
            (&format!("/{}", "a".repeat(256)), "longer"),
        ] {
            let e = check_route(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn field_names_and_aliases_that_could_never_apply_are_refused() {
        let k = KafkaConfig::default();
        let err = |s: StreamConfig| validate(&k, &[s]).unwrap_err();
        let mut s = stream("a", &["/x"], "t");
        s.required = vec!["message".into(), "".into()];
        assert!(err(s).starts_with("streams.a.required: field name \"\""));
        let mut s = stream("a", &["/x"], "t");
        s.key_field = "type ".into();
        assert!(err(s).starts_with("streams.a.key-field:"));
        let mut s = stream("a", &["/x"], "t");
        s.required = vec!["a\nb".into()];
        assert!(err(s).contains("control"));
        for builtin in ["WARN", "warning", " Error "] {
            let mut s = stream("a", &["/x"], "t");
            s.severity_aliases.insert(builtin.into(), "ERROR".into());
            let e = err(s);
            assert!(
                e.starts_with("streams.a.severity-aliases:") && e.contains("built-in"),
                "{e}"
            );
        }
        let mut s = stream("a", &["/x"], "t");
        s.severity_aliases.insert("crit".into(), "FATAL".into());
        s.severity_aliases.insert("CRIT".into(), "FATAL".into());
        assert!(err(s).contains("twice"));
        // Dotted names are top-level keys of that name: accepted.
        let mut s = stream("a", &["/x"], "t");
        s.required = vec!["log.level".into()];
        s.key_field = "k8s.pod".into();
        s.severity_aliases.insert("notice".into(), "INFO".into());
        validate(&k, &[s]).unwrap();
    }

    #[test]
    fn the_default_stream_serves_the_unclaimed_builtin_paths() {
        let k = KafkaConfig::default();
        let s = Streams::resolve(
            &Limits::default(),
            &EventsConfig::default(),
            &k,
            &[stream("logs", &["/logs", "/x"], "logs")],
        );
        let routes: Vec<(&str, &str)> = s.routes().map(|(r, s)| (r, s.name.as_str())).collect();
        assert_eq!(
            routes,
            [
                ("/v1/events", "default"),
                ("/ingest", "default"),
                ("/events", "default"),
                ("/v1/logs", "default"),
                ("/logs", "logs"),
                ("/x", "logs")
            ]
        );
        let t = s.topics();
        assert_eq!(t.of("default").unwrap().topic, k.topic);
        assert_eq!(t.of("logs").unwrap().dead_letter_topic, "logs-dlq");
    }
}
