//! The deploy files against the real daemon: every metric the Grafana
//! dashboard and the Prometheus alert rules name is one that a running
//! `sluice serve --dev` exports after some traffic, every alert has a runbook
//! line in the README, and list settings given through the environment reach
//! the daemon as a user writes them.
// Fixtures use plain std::fs; the product goes through `storage`.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use support::{Serve, EXE};

const DASHBOARD: &str = include_str!("../deploy/grafana/sluice.json");
const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yml");
const README: &str = include_str!("../README.md");

/// A daemon with the embedded dev broker on a free loopback port; killed on
/// drop so a failed assertion leaves no process behind.
struct Daemon {
    addr: String,
    _serve: support::Daemon,
}

impl Daemon {
    fn start(env: &[(&str, &str)]) -> Daemon {
        let serve = Serve::temp()
            .arg("--dev")
            .envs(&[("SLUICE_WAL_MIN_FREE_BYTES", "0")])
            .envs(env)
            .start();
        Daemon {
            addr: serve.addr.clone(),
            _serve: serve,
        }
    }

    /// One HTTP/1.1 request on a fresh connection: (status, body).
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {out:?}"));
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, body.to_string())
    }
}

fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every `sluice_*` and `process_*` name in a text (a dashboard, a rules
/// file): the metrics it queries.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    for prefix in ["sluice_", "process_"] {
        for (i, _) in text.match_indices(prefix) {
            if i > 0 && word(bytes[i - 1]) {
                continue;
            }
            let end = text[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| i + n);
            names.insert(text[i..end].to_string());
        }
    }
    names
}

/// The PromQL the dashboard runs: every panel target's `expr` and every
/// template variable's `query` (descriptions are prose, not queries).
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(q)) => out.push(q.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&serde_json::from_str(DASHBOARD).unwrap(), &mut out);
    out
}

/// The sample names of a Prometheus text exposition (so histograms appear
/// as their `_bucket`, `_sum` and `_count` series, as PromQL names them).
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn dashboard_and_alerts_name_only_metrics_the_daemon_exports() {
    let d = Daemon::start(&[]);
    // Traffic that makes every labelled series the files use appear: an
    // accepted event (per-tenant counter, HTTP histogram), a rejected one,
    // and a delivery to the dev broker (delivery histogram).
    let (status, body) = d.request(
        "POST",
        "/v1/events",
        r#"[{"tenant_id":"acme","source":"web","message":"hi"},{"tenant_id":"acme"}]"#,
    );
    assert_eq!(status, 202, "{body}");
    let seq: u64 = serde_json::from_str::<serde_json::Value>(&body).unwrap()["first_seq"]
        .as_u64()
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "delivery to the dev broker",
        || {
            let (_, r) = d.request("GET", &format!("/v1/receipts/{seq}"), "");
            r.contains(r#""delivered":true"#).then_some(())
        },
    );
    let (status, scrape) = d.request("GET", "/metrics", "");
    assert_eq!(status, 200);
    let have = exported(&scrape);

    for (file, text) in [
        ("deploy/grafana/sluice.json", dashboard_queries().join("\n")),
        ("deploy/prometheus/alerts.yml", ALERTS.to_string()),
    ] {
        let wanted = metric_names(&text);
        assert!(
            wanted.len() >= 8,
            "{file}: only {wanted:?}: is the file read?"
        );
        let missing: Vec<_> = wanted.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics the daemon does not export: {missing:?}\nexported: {have:?}"
        );
    }
    // The per-tenant panels read the tenant label.
    assert!(
        scrape.contains(r#"sluice_tenant_events_total{outcome="accepted",tenant="acme"} 1"#),
        "{scrape}"
    );
}

#[test]
fn the_name_check_catches_a_metric_the_daemon_does_not_export() {
    let have = exported("# TYPE sluice_a_seconds histogram\nsluice_a_seconds_bucket{le=\"1\"} 0\nsluice_b_total 3\n");
    let wanted = metric_names(
        r#"{"expr": "rate(sluice_a_seconds_bucket[5m]) / sluice_b_total + sluice_c_total"}"#,
    );
    let missing: Vec<_> = wanted.difference(&have).collect();
    assert_eq!(missing, ["sluice_c_total"]);
}

#[test]
fn every_alert_has_a_runbook_line_in_the_readme() {
    let alerts: Vec<&str> = ALERTS
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    let runbook = README
        .split_once("\n### Alerts")
        .expect("a README section `### Alerts`")
        .1;
    for a in alerts {
        assert!(
            runbook
                .lines()
                .any(|l| l.starts_with(&format!("- **{a}**"))),
            "README has no runbook line `- **{a}**`"
        );
    }
}

fn check_config_print(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(EXE);
    cmd.args(["check-config", "--print", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("sluice.example.toml"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_list_setting_takes_a_toml_array_from_the_environment() {
    // check-config shows what the daemon will run with.
    let empty = check_config_print(&[("SLUICE_EVENTS_REQUIRED", "[]")]);
    assert!(empty.contains("\nrequired = []\n"), "{empty}");
    let two = check_config_print(&[("SLUICE_EVENTS_REQUIRED", r#"["tenant_id","zone"]"#)]);
    assert!(two.contains(r#"required = ["tenant_id", "zone"]"#), "{two}");
    let commas = check_config_print(&[("SLUICE_EVENTS_REQUIRED", "tenant_id, zone")]);
    assert!(
        commas.contains(r#"required = ["tenant_id", "zone"]"#),
        "{commas}"
    );

    // No required field: an event with none of the default ones is taken.
    let d = Daemon::start(&[("SLUICE_EVENTS_REQUIRED", "[]")]);
    let (status, body) = d.request("POST", "/v1/events", r#"{"note":"no tenant"}"#);
    assert_eq!(status, 202, "{body}");
    drop(d);

    // A required field that is not a default one is enforced by name.
    let d = Daemon::start(&[("SLUICE_EVENTS_REQUIRED", r#"["tenant_id","zone"]"#)]);
    let (status, body) = d.request("POST", "/v1/events", r#"{"tenant_id":"acme"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("zone"), "{body}");
    let (status, body) = d.request("POST", "/v1/events", r#"{"tenant_id":"acme","zone":"eu"}"#);
    assert_eq!(status, 202, "{body}");
}
