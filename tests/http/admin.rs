//! The admin listener of a real `sluice serve --dev`: what it serves, CPU
//! profiles that parse as pprof protobuf and SVG, profiling off by default,
//! the ingest port without `/metrics`, and the configuration checks.

use std::io::Read;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pprof::protos::Message;

use super::daemon::{raw, Daemon, Resp};

const EXE: &str = env!("CARGO_BIN_EXE_sluice");

fn get(addr: SocketAddr, path: &str) -> Resp {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn dev(config: &str) -> Daemon {
    Daemon::start_env(config, &[("SLUICE_DEV", "true")])
}

fn admin(d: &Daemon) -> SocketAddr {
    d.admin_addr().expect("the admin listener is on")
}

fn events(n: usize) -> Vec<u8> {
    let evs: Vec<_> = (0..n)
        .map(|i| serde_json::json!({"tenant_id": "acme", "source": "load", "message": format!("m{i}")}))
        .collect();
    serde_json::to_vec(&evs).unwrap()
}

/// Waits until the daemon's log contains `needle`.
fn wait_log(d: &Daemon, needle: &str) {
    let t0 = Instant::now();
    while !d.log().contains(needle) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {needle:?} in the log: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// POSTs batches from two threads until `stop`; the statuses seen.
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Vec<u16>>> {
    (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let body = events(200);
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut req = format!(
                        "POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    req.extend_from_slice(&body);
                    seen.push(raw(addr, &req).status);
                }
                seen
            })
        })
        .collect()
}

#[test]
fn the_admin_listener_serves_metrics_stats_health_and_ready() {
    let d = dev("");
    let a = admin(&d);
    assert_ne!(a, d.addr);
    let r = d.post(
        "/v1/events",
        &[("Content-Type", "application/json")],
        &events(3),
    );
    assert_eq!(r.status, 202, "{r:?}");

    let m = get(a, "/metrics");
    assert_eq!(m.status, 200, "{m:?}");
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(m.body).unwrap();
    assert!(
        text.lines().any(|l| l == "sluice_events_accepted_total 3"),
        "the admin /metrics is the daemon's own: {text}"
    );
    let s = get(a, "/stats");
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.json()["ingest"]["events_accepted"], 3, "{s:?}");
    assert_eq!(get(a, "/health").json()["status"], "ok");
    // 503 only if the shared test disk is nearly full; either way, readiness.
    assert!(get(a, "/ready").json()["ready"].is_boolean());
    // The ingest port keeps them by default.
    assert_eq!(d.get("/metrics").status, 200);
    assert_eq!(d.get("/stats").status, 200);
    // Nothing else: no ingest on the admin port.
    let r = raw(
        a,
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n[]",
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.json()["error"].is_string(), "{r:?}");
}

#[test]
fn profiling_is_off_by_default_and_says_how_to_turn_it_on() {
    let d = dev("");
    let r = get(admin(&d), "/debug/pprof/profile?seconds=1");
    assert_eq!(r.status, 404, "{r:?}");
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.contains("http.profiling = true") && msg.contains("SLUICE_HTTP_PROFILING"),
        "{msg}"
    );
    // Never on the ingest port, on or off.
    assert_eq!(d.get("/debug/pprof/profile?seconds=1").status, 404);
}

#[test]
fn a_cpu_profile_under_load_parses_and_ingest_is_unharmed() {
    let d = dev("[http]\nprofiling = true\n");
    let a = admin(&d);
    for bad in ["seconds=0", "seconds=61", "seconds=abc", "format=png"] {
        let r = get(a, &format!("/debug/pprof/profile?{bad}"));
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert!(r.json()["error"].is_string(), "{bad}: {r:?}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let loaders = load(d.addr, stop.clone());
    let profile = std::thread::spawn(move || get(a, "/debug/pprof/profile?seconds=3"));
    wait_log(&d, "CPU profile started");
    // The profiler is process-wide: a second request waits for nothing.
    let busy = get(a, "/debug/pprof/profile?seconds=1");
    assert_eq!(busy.status, 409, "{busy:?}");
    let r = profile.join().unwrap();
    // And a flame graph, still under load.
    let svg = get(a, "/debug/pprof/profile?seconds=2&format=svg");
    stop.store(true, Ordering::Relaxed);
    let statuses: Vec<u16> = loaders
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|&s| s == 202),
        "SIGPROF must not fail a request or a WAL write: {statuses:?}"
    );
    assert_eq!(get(a, "/health").json()["status"], "ok");

    assert_eq!(r.status, 200, "{}", d.log());
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        &r.body[..2],
        &[0x1f, 0x8b],
        "gzip'd, as Go's pprof serves it"
    );
    let mut raw_profile = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_end(&mut raw_profile)
        .unwrap();
    let p = pprof::protos::Profile::decode(raw_profile.as_slice()).expect("pprof protobuf");
    let s = |i: i64| p.string_table[usize::try_from(i).unwrap()].as_str();
    let types: Vec<(&str, &str)> = p.sample_type.iter().map(|t| (s(t.ty), s(t.unit))).collect();
    assert!(types.contains(&("cpu", "nanoseconds")), "{types:?}");
    assert!(!p.sample.is_empty(), "a loaded daemon yields samples");
    assert!(!p.function.is_empty());
    assert!(
        p.function.iter().any(|f| s(f.name).contains("sluice")),
        "symbolized: names sluice's own functions"
    );

    assert_eq!(svg.status, 200, "{svg:?}");
    assert_eq!(svg.header("content-type"), Some("image/svg+xml"));
    let svg = String::from_utf8(svg.body).unwrap();
    assert!(
        svg.starts_with("<?xml") || svg.starts_with("<svg"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.contains("sluice::"), "names sluice's functions");
    assert!(svg.contains("</svg>"));
}

#[test]
fn shutdown_ends_a_profile_in_progress() {
    let mut d = dev("[http]\nprofiling = true\n");
    let a = admin(&d);
    let profile = std::thread::spawn(move || get(a, "/debug/pprof/profile?seconds=60"));
    wait_log(&d, "CPU profile started");
    let pid = d.serve.pid();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Well before the profile's 60 s: the deadline here only stops a hung test.
    let r = profile.join().unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    let status = d.serve.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", d.log());
}

#[test]
fn metrics_on_ingest_false_leaves_metrics_and_stats_to_the_admin_port() {
    let d = dev("[http]\nmetrics-on-ingest = false\n");
    for path in ["/metrics", "/stats"] {
        let r = d.get(path);
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert!(r.json()["error"].is_string());
        assert_eq!(get(admin(&d), path).status, 200, "{path}");
    }
    assert_eq!(d.get("/health").status, 200);
    assert!(d.get("/ready").json()["ready"].is_boolean());
}

#[test]
fn a_taken_admin_port_stops_startup_with_its_name() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(EXE)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("SLUICE_HTTP_ADMIN_LISTEN", &port)
        .env("SLUICE_WAL_MIN_FREE_BYTES", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("http.admin-listen {port}")), "{err}");
    assert!(!dir.path().join("wal").exists(), "nothing opened: {err}");
}

/// The ingest listener and `sluice archive --listen` name their address
/// too (the third report of a bare "Address already in use").
#[test]
fn a_taken_port_names_its_setting_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(EXE)
        .args(["serve", "--dev", "--listen", &port, "--data-dir"])
        .arg(dir.path().join("data"))
        .env("SLUICE_HTTP_ADMIN_LISTEN", "")
        .env("SLUICE_WAL_MIN_FREE_BYTES", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("http.listen {port}: ")), "{err}");
    // Logs to a pipe carry no colour codes.
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escape in a non-terminal log: {err:?}"
    );

    let out = Command::new(EXE)
        .args(["archive", "--brokers", "127.0.0.1:1", "--dir"])
        .arg(dir.path().join("archive"))
        .args(["--listen", &port])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("archive --listen {port}: ")), "{err}");
}

/// `sluice check-config` on `text`, with `env`: exit code and stderr.
fn check(text: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sluice.toml");
    std::fs::write(&f, text).unwrap();
    let out = Command::new(EXE)
        .args(["check-config", "--print", "--config"])
        .arg(&f)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let mut all = String::from_utf8_lossy(&out.stderr).to_string();
    all.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code().unwrap(), all)
}

#[test]
fn check_config_validates_the_admin_settings() {
    let (code, out) = check("[http]\nlisten = \"0.0.0.0:9181\"\n", &[]);
    assert_eq!(
        code, 1,
        "the default admin port under a wildcard listen: {out}"
    );
    assert!(
        out.contains(
            "http.admin-listen 127.0.0.1:9181 is the same port as http.listen 0.0.0.0:9181"
        ),
        "{out}"
    );
    let (code, out) = check(
        "[http]\nlisten = \"127.0.0.1:8080\"\nadmin-listen = \"127.0.0.1:8080\"\n",
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":3: ") && out.contains("same port"), "{out}");
    let (code, out) = check("[http]\nadmin-listen = \"localhost\"\n", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":2: ") && out.contains("not an address"),
        "{out}"
    );
    let (code, out) = check("[http]\nadmin-listen = \"\"\nprofiling = true\n", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("http.profiling needs http.admin-listen"),
        "{out}"
    );
    let (code, out) = check(
        "[http]\nadmin-listen = \"\"\nmetrics-on-ingest = false\n",
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nowhere"), "{out}");
    // Other hosts' addresses and port 0 are fine; the environment applies.
    let (code, out) = check(
        "[http]\nlisten = \"10.0.0.1:9181\"\nadmin-listen = \"127.0.0.1:9181\"\n",
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = check(
        "",
        &[
            ("SLUICE_HTTP_PROFILING", "true"),
            ("SLUICE_HTTP_ADMIN_LISTEN", "127.0.0.1:0"),
            ("SLUICE_HTTP_METRICS_ON_INGEST", "false"),
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("admin-listen = \"127.0.0.1:0\"")
            && out.contains("profiling = true")
            && out.contains("metrics-on-ingest = false"),
        "{out}"
    );
}
