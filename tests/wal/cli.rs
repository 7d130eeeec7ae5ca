//! `sluice wal verify|dump|stats` against real data directories.

use std::process::Command;

use sluice::replay::offsets::OffsetStore;
use sluice::wal::format;

use super::{open_std, rec, segment_files, small_cfg};

fn sluice(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn populated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let wal = open_std(&small_cfg(dir.path()), 0).0;
    for i in 1..=30 {
        wal.append_blocking(vec![rec(&format!(r#"{{"n":{i},"pad":"{:0>40}"}}"#, 0))])
            .unwrap();
    }
    OffsetStore::open(&dir.path().join("offsets"))
        .unwrap()
        .commit(4)
        .unwrap();
    dir
}

#[test]
fn verify_passes_a_healthy_wal_and_fails_a_damaged_one_with_the_lost_range() {
    let dir = populated();
    let d = dir.path().to_str().unwrap();
    let (code, out, _) = sluice(&["wal", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("OK:") && out.contains("30 records") && out.contains("committed offset 4"),
        "{out}"
    );

    let segs = segment_files(dir.path());
    let second = format::parse_segment_name(&segs[1]).unwrap();
    let third = format::parse_segment_name(&segs[2]).unwrap();
    let path = dir.path().join("wal").join(&segs[1]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[format::HEADER_LEN + 20] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (code, out, _) = sluice(&["wal", "verify", "--data-dir", d]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("LOST {second}..={}", third - 1)),
        "{out}"
    );
    assert!(out.contains("DAMAGED"), "{out}");
    // The problem is located by its byte offset in the file, not as "+0
    // bytes from end".
    // The damaged byte is in the first frame: the walk stops at its start.
    let at = format::HEADER_LEN;
    assert!(out.contains(&format!("PROBLEM at byte {at} (")), "{out}");
    assert!(!out.contains("bytes from end"), "{out}");
    // verify is read-only: the damaged file is untouched and nothing is quarantined.
    assert!(!dir.path().join("quarantine").exists());
}

#[test]
fn dump_prints_ndjson_records_from_a_sequence_number() {
    let dir = populated();
    let d = dir.path().to_str().unwrap();
    let (code, out, err) = sluice(&["wal", "dump", "--data-dir", d, "--from", "28"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["seq"], 28);
    assert_eq!(
        lines[0]["value"]["n"], 28,
        "JSON values are embedded as JSON"
    );
    assert_eq!(lines[0]["key"], "tenant");
    let (_, out, _) = sluice(&["wal", "dump", "--data-dir", d, "--limit", "2"]);
    assert_eq!(out.lines().count(), 2);
}

#[test]
fn stats_reports_range_bytes_and_committed_offset() {
    let dir = populated();
    let (code, out, _) = sluice(&["wal", "stats", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["first_seq"], 1);
    assert_eq!(v["last_seq"], 30);
    assert_eq!(v["committed"], 4);
    assert_eq!(v["backlog_records"], 26);
    assert_eq!(v["segments"], segment_files(dir.path()).len());
    assert!(v["bytes"].as_u64().unwrap() > 30 * 60);
}

#[test]
fn missing_data_dir_is_a_usage_error() {
    let (code, _, err) = sluice(&["wal", "verify", "--data-dir", "/nonexistent/sluice"]);
    assert_eq!(code, 2);
    assert!(err.contains("no wal/ directory"), "{err}");
}

#[test]
fn check_config_reports_file_and_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let conflict = dir.path().join("conflict.toml");
    std::fs::write(
        &conflict,
        "data-dir = \"/x\"\n[limits]\nmax-body-bytes = 1000\nmax-event-bytes = 2000\n",
    )
    .unwrap();
    let (code, _, err) = sluice(&["check-config", "--config", conflict.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("conflict.toml:4: ") && err.contains("limits.max-event-bytes"),
        "{err}"
    );

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[wal]\nsegment-bytez = 5\n").unwrap();
    let (code, _, err) = sluice(&["check-config", "--config", typo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("line 2") && err.contains("segment-bytez"),
        "{err}"
    );

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/sluice.example.toml");
    let (code, out, err) = sluice(&["check-config", "--config", example, "--print"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("segment-bytes = 67108864"), "{out}");
}

/// Copies a directory tree (so a fixture is never opened in place: the
/// offset store writes on open).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// `wal verify`, `stats` and `dump` read a data dir written by the
/// version-1 build: its six records, as records of the default stream.
#[test]
fn wal_tools_read_a_version_1_data_dir_as_the_default_stream() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wal-v1/data"),
        &data,
    );
    let d = data.to_str().unwrap();
    let (code, out, err) = sluice(&["wal", "verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("6 records") && out.contains("0 records lost"),
        "{out}"
    );
    let (code, out, _) = sluice(&["wal", "stats", "--data-dir", d]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["records"].as_u64(), v["lost_records"].as_u64()),
        (Some(6), Some(0))
    );
    let (code, out, _) = sluice(&["wal", "dump", "--data-dir", d]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["value"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["fx-1", "fx-2", "fx-3", "fx-4", "fx-5", "fx-6"]);
    assert!(lines.iter().all(|l| l["stream"] == "default"));
}

/// `check-config` refuses two streams claiming one route, two streams of
/// one name and a topic name Kafka would refuse, naming what is wrong, and
/// accepts examples/migrate.toml.
#[test]
fn check_config_refuses_stream_conflicts_and_bad_topics() {
    let dir = tempfile::tempdir().unwrap();
    let stream = |name: &str, route: &str, topic: &str| {
        format!("[[streams]]\nname = \"{name}\"\nroutes = [\"{route}\"]\ntopic = \"{topic}\"\ndead-letter-topic = \"{topic}-dlq\"\n")
    };
    for (file, text, want) in [
        (
            "route.toml",
            stream("a", "/x", "ta") + &stream("b", "/x", "tb"),
            "streams.b.routes: \"/x\" is claimed by both \"a\" and \"b\"",
        ),
        (
            "name.toml",
            stream("a", "/x", "ta") + &stream("a", "/y", "tb"),
            "two streams are named \"a\"",
        ),
        (
            "topic.toml",
            stream("a", "/x", "bad/topic"),
            "streams.a.topic \"bad/topic\"",
        ),
        (
            "dots.toml",
            stream("a", "/x", ".."),
            "streams.a.topic \"..\"",
        ),
        (
            "long.toml",
            stream("a", "/x", &"t".repeat(250)),
            "1 to 249 characters",
        ),
        (
            "kafka.toml",
            "[kafka]\ntopic = \"has space\"\n".to_string(),
            "kafka.topic \"has space\"",
        ),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = sluice(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{file}: {err}");
        assert!(err.contains(want), "{file}: {err}");
    }
    let migrate = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/migrate.toml");
    let (code, _, err) = sluice(&["check-config", "--config", migrate]);
    assert_eq!(code, 0, "{err}");
}

/// A mistyped `--dir` is an error, not an archive that saw no traffic.
#[test]
fn analytics_of_a_missing_or_empty_dir_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent");
    let (code, out, err) = sluice(&["analytics", "--dir", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("nonexistent") && err.contains("No such file"),
        "{err}"
    );
    let (code, out, err) = sluice(&["analytics", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("is empty"), "{err}");
}

/// The README states the effective event limit with the defaults; it must
/// be what `check-config` prints (the example config once said 998645).
#[test]
fn the_documented_default_event_limit_is_what_check_config_prints() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("sluice.example.toml");
    let (code, out, err) = sluice(&["check-config", "--config", example.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let all = format!("{out}{err}");
    let printed: u64 = all
        .lines()
        .find_map(|l| l.strip_prefix("effective limits.max-event-bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no effective limit printed: {all}"));
    let mut grouped = String::new();
    for (i, c) in printed.to_string().chars().rev().enumerate() {
        if i > 0 && i % 3 == 0 {
            grouped.insert(0, ',');
        }
        grouped.insert(0, c);
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("({grouped} bytes with the defaults")),
        "README should state {grouped}"
    );
}

/// `check-config` reads the files `serve` reads at start: a keys file that
/// does not exist is refused, not found only when the daemon starts.
#[test]
fn check_config_refuses_a_missing_keys_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    let missing = dir.path().join("no-such-keys.toml");
    std::fs::write(
        &cfg,
        format!("[auth]\nkeys-file = {:?}\n", missing.display().to_string()),
    )
    .unwrap();
    let (code, out, err) = sluice(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no-such-keys.toml"), "{err}");
    assert!(!err.contains(": OK"), "{err}");
}

/// librdkafka's own refusals carry the `FILE:LINE:` form like every other
/// config error, naming the property.
#[test]
fn check_config_points_at_the_line_of_a_bad_librdkafka_property() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    for (text, line) in [
        ("[kafka]\ntopic = \"t\"\n\n[kafka.librdkafka]\n\"linger.ms\" = \"5\"\n\"no.such.prop\" = \"1\"\n", 6),
        ("[kafka.librdkafka]\n\"acks\" = \"0\"\n", 2),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (code, out, err) = sluice(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains(&format!("sluice.toml:{line}: ")) && err.contains("kafka.librdkafka."),
            "{err}"
        );
    }
}
