//! Every curl command in the README and docs/ runs against a real daemon, so
//! the examples stay true: each must get a 2xx, and where the docs show the
//! answer as JSON, the `accepted`/`rejected` counts must match.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::daemon::Daemon;

/// One shell command from a fenced `sh` block: continuation lines (`\` or a
/// trailing `|`) joined, with the documented answer when a `# {...}` comment
/// follows it on the same or the next line.
#[derive(Debug)]
struct Example {
    file: String,
    line: usize,
    command: String,
    answer: Option<Value>,
}

/// Splits off a trailing `# comment` outside quotes.
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let (mut single, mut double) = (false, false);
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'#' if !single && !double && (i == 0 || bytes[i - 1] == b' ') => {
                return (&line[..i], Some(line[i + 1..].trim()));
            }
            _ => {}
        }
    }
    (line, None)
}

fn examples(file: &Path) -> Vec<Example> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out: Vec<Example> = Vec::new();
    let (mut in_sh, mut pending): (bool, Option<(usize, String)>) = (false, None);
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") {
            in_sh = !in_sh && (t == "```sh" || t == "```bash" || t == "```shell");
            continue;
        }
        if !in_sh {
            continue;
        }
        let (code, comment) = split_comment(line);
        let code = code.trim_end();
        if code.trim().is_empty() {
            // A comment line right after a command may be its answer.
            if let (Some(c), Some(last)) = (comment, out.last_mut()) {
                if last.answer.is_none() && last.line + 1 >= i {
                    last.answer = serde_json::from_str(c).ok();
                }
            }
            continue;
        }
        let (start, mut cmd) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(c) = code.strip_suffix('\\') {
            cmd.push_str(c);
            pending = Some((start, cmd));
            continue;
        }
        cmd.push_str(code);
        if code.ends_with('|') {
            cmd.push(' ');
            pending = Some((start, cmd));
            continue;
        }
        out.push(Example {
            file: file.display().to_string(),
            line: i + 1,
            command: cmd,
            answer: comment.and_then(|c| serde_json::from_str(c).ok()),
        });
        let _ = start;
    }
    out.retain(|e| e.command.contains("curl "));
    out
}

/// Runs one example in `dir` against `addr`; the HTTP status and body.
fn run(e: &Example, d: &Daemon, key: &str, dir: &Path) -> (u16, String) {
    let admin = d.admin_addr().map(|a| a.to_string()).unwrap_or_default();
    let cmd = e
        .command
        .replace("localhost:8080", &d.addr.to_string())
        .replace("localhost:9181", &admin)
        .replace("sluice_5c1e...", key);
    let script = format!("set -o pipefail; {cmd} -w '\\n%{{http_code}}'");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}:{}: `{script}` failed: {stdout} {}",
        e.file,
        e.line,
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn every_curl_example_in_the_docs_works() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for f in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    files.sort();
    let all: Vec<Example> = files.iter().flat_map(|f| examples(f)).collect();
    assert!(all.len() >= 7, "found only {all:?}");

    // Profiling on: the profiling examples use the admin listener.
    let open = Daemon::start("[http]\nprofiling = true\n");
    // The API-key examples run against a daemon with a keys file.
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("keys.toml");
    let added = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["keys", "add", "--file"])
        .arg(&keys)
        .args(["--name", "acme-shipper", "--tenant", "acme"])
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let key = String::from_utf8(added.stdout)
        .unwrap()
        .split_whitespace()
        .find(|w| w.starts_with("sluice_"))
        .expect("a printed key")
        .to_string();
    let authed = Daemon::start(&format!(
        "[auth]\nkeys-file = {:?}\n",
        keys.display().to_string()
    ));

    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("events.json"),
        r#"[{"tenant_id":"acme","source":"web","message":"from a file"}]"#,
    )
    .unwrap();
    for e in &all {
        let d = if e.command.contains("Authorization") || e.command.contains("X-API-Key") {
            &authed
        } else {
            &open
        };
        let (status, body) = run(e, d, &key, work.path());
        assert!(
            (200..300).contains(&status),
            "{}:{}: {} -> {status} {body}",
            e.file,
            e.line,
            e.command
        );
        if let Some(answer) = &e.answer {
            let got: Value = serde_json::from_str(&body).unwrap();
            for k in ["accepted", "rejected"] {
                if answer.get(k).is_some() {
                    assert_eq!(got[k], answer[k], "{}:{}: {body}", e.file, e.line);
                }
            }
        }
    }
}

/// The README's "Without Kafka" configuration, as written (its archive dir
/// moved into a temp dir), takes the Log Pipeline's own request on `/logs`:
/// the snippet once lacked the stream and answered 400.
#[test]
fn the_without_kafka_snippet_takes_a_log_pipeline_request() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("### Without Kafka")
        .nth(1)
        .expect("the section exists");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("its toml block");
    let archive = tempfile::tempdir().unwrap();
    let config = block.replace(
        "\"/var/lib/sluice-archive\"",
        &format!("{:?}", archive.path().display().to_string()),
    );
    assert_ne!(config, block, "the snippet names its archive dir");
    let d = Daemon::start(&config);
    let r = d.post(
        "/logs",
        &[("Content-Type", "application/json")],
        br#"{"timestamp":"2026-11-26T12:00:00Z","path":"/checkout","userAgent":"curl/8"}"#,
    );
    assert_eq!(r.status, 202, "{r:?}");
}
