//! Configuration that `check-config` accepts must start `serve`; what
//! `serve` would crash on, or accept and never use, `check-config` refuses
//! first. Each bad file is run through the real binary both ways: the
//! checker exits 1 with `FILE:LINE: message`, and `serve` exits 2 at start
//! with the same message, before it binds a port or creates its data dir.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::support::EXE;

fn stream(name: &str, body: &str) -> String {
    format!(
        "[[streams]]\nname = \"{name}\"\ntopic = \"{name}\"\ndead-letter-topic = \"{name}-dlq\"\n{body}\n"
    )
}

/// (file name, text, what the message must say, 1-based line it points at).
fn bad_configs() -> Vec<(&'static str, String, &'static str, usize)> {
    let api = |body: &str| stream("api", body);
    vec![
        // The router reads these as a parameter or a wildcard, or panics.
        ("colon.toml", api("routes = [\"/:id\"]"), "':'", 5),
        ("brace.toml", api("routes = [\"/{id}\"]"), "'{'", 5),
        ("close.toml", api("routes = [\"/a}\"]"), "'}'", 5),
        ("star.toml", api("routes = [\"/*rest\"]"), "'*'", 5),
        ("star2.toml", api("routes = [\"/a/b*\"]"), "'*'", 5),
        // Clients percent-encode these, so the route never matches.
        (
            "unicode.toml",
            api("routes = [\"/ünï\"]"),
            "percent-encode",
            5,
        ),
        ("percent.toml", api("routes = [\"/a%20b\"]"), "'%'", 5),
        (
            "space.toml",
            api("routes = [\"/a b\"]"),
            "percent-encode",
            5,
        ),
        ("dots.toml", api("routes = [\"/a/../b\"]"), "dot segment", 5),
        (
            "empty.toml",
            api("routes = [\"/a//b\"]"),
            "empty segment",
            5,
        ),
        (
            "relative.toml",
            api("routes = [\"events\"]"),
            "start with /",
            5,
        ),
        // Collisions with another stream or a status endpoint.
        (
            "twice.toml",
            api("routes = [\"/x\"]") + &stream("web", "routes = [\"/x\"]"),
            "claimed by both",
            10,
        ),
        (
            "same.toml",
            api("routes = [\"/x\", \"/x\"]"),
            "listed twice",
            5,
        ),
        ("health.toml", api("routes = [\"/health\"]"), "reserved", 5),
        (
            "receipt.toml",
            api("routes = [\"/v1/receipts/7\"]"),
            "reserved",
            5,
        ),
        // Field names that no event can satisfy or carry.
        (
            "required.toml",
            api("routes = [\"/x\"]\nrequired = [\"\"]"),
            "streams.api.required",
            6,
        ),
        (
            "keyfield.toml",
            api("routes = [\"/x\"]\nkey-field = \" type\""),
            "streams.api.key-field",
            6,
        ),
        (
            "events.toml",
            "[events]\nrequired = [\"tenant_id\", \"\"]\n".into(),
            "events.required",
            2,
        ),
        (
            "timestamp.toml",
            "[archive]\ntimestamp-field = \" \"\n".into(),
            "archive.timestamp-field",
            2,
        ),
        // An alias of a built-in level would be silently ignored.
        (
            "alias.toml",
            api("routes = [\"/x\"]\nseverity-aliases = { WARN = \"ERROR\" }"),
            "\"WARN\" is a built-in severity",
            6,
        ),
        (
            "alias-case.toml",
            api("routes = [\"/x\"]\nseverity-aliases = { crit = \"FATAL\", CRIT = \"ERROR\" }"),
            "twice",
            6,
        ),
    ]
}

/// `sluice serve --dev --config FILE` on a data dir that does not exist;
/// (exit code, stderr), or a panic if it is still running after `within`.
fn serve(config: &Path, data: &Path, within: Duration) -> (i32, String) {
    let log = data.with_extension("log");
    let mut child = Command::new(EXE)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("SLUICE_HTTP_ADMIN_LISTEN", "")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{}: serve still running after {within:?}:\n{}",
                config.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn every_config_serve_would_crash_on_or_never_use_is_refused_by_both() {
    let dir = tempfile::tempdir().unwrap();
    for (file, text, want, line) in bad_configs() {
        let path = dir.path().join(file);
        std::fs::write(&path, &text).unwrap();
        let p = path.to_str().unwrap();
        let out = Command::new(EXE)
            .args(["check-config", "--config", p])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: check-config: {err}");
        let located = format!("{p}:{line}: ");
        assert!(
            err.contains(&located) && err.contains(want),
            "{file}: check-config should say {located}...{want}:\n{err}\n{text}"
        );

        let data = dir.path().join(format!("{file}.data"));
        let (code, log) = serve(&path, &data, Duration::from_secs(20));
        assert_eq!(code, 2, "{file}: serve:\n{log}");
        assert!(
            log.contains(&located) && log.contains(want),
            "{file}: serve should say {located}...{want}:\n{log}"
        );
        assert!(!log.contains("listening"), "{file}: serve listened:\n{log}");
        assert!(!data.exists(), "{file}: serve created its data dir");
    }
}

/// The good neighbours of the files above start: plain routes (`-._~`,
/// digits, upper case, a trailing slash), field names with dots, and aliases
/// of names that are not built in.
#[test]
fn the_plain_forms_are_accepted_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let text = stream(
        "api",
        "routes = [\"/v2/Events_x-y.z~\", \"/hooks/\", \"/\"]\nrequired = [\"log.level\", \"message\"]\nkey-field = \"k8s.pod\"\nseverity-aliases = { CRITICAL = \"FATAL\", notice = \"INFO\" }",
    );
    let path = dir.path().join("good.toml");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(EXE)
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = super::support::Serve::new(&dir.path().join("data"))
        .arg("--dev")
        .arg("--config")
        .arg(&path)
        .start();
    let body = r#"{"log.level":"x","message":"m","k8s.pod":"p","severity":"notice"}"#;
    for route in ["/v2/Events_x-y.z~", "/hooks/", "/"] {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args(["-H", "content-type: application/json", "-d", body])
            .arg(format!("http://{}{route}", d.addr))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "202", "{route}");
    }
    assert_eq!(d.stop().code(), Some(0));
}
