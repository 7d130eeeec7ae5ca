//! Replays the committed fuzz corpus (seeds and any crash reproducers saved
//! next to them) through the fuzz target bodies on every test run.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(
        n >= 3,
        "{target}: expected a seed corpus in {}",
        dir.display()
    );
}

#[test]
fn wal_segment_corpus() {
    replay("wal_segment", sluice::fuzzing::wal_segment);
}

#[test]
fn wal_record_corpus() {
    replay("wal_record", sluice::fuzzing::wal_record);
}

#[test]
fn a_valid_seed_really_decodes() {
    // Guards the corpus itself: if the format changes, the seeds must too.
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/wal_record/seed-record"),
    )
    .unwrap();
    let r = sluice::wal::Record::decode(&seed).expect("seed matches the record encoding");
    assert_eq!(r.key.as_deref(), Some(&b"tenant-a"[..]));
    assert_eq!(r.stream, "default", "a version-1 record");
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/wal_record/seed-v2-record-1"),
    )
    .unwrap();
    let r = sluice::wal::Record::decode(&seed).expect("seed matches the v2 record encoding");
    assert_eq!(r.stream, "logs");
    assert_eq!(r.encode(), seed);
}

#[test]
fn ingest_body_corpus() {
    replay("ingest_body", sluice::fuzzing::ingest_body);
}

#[test]
fn otlp_logs_corpus() {
    replay("otlp_logs", sluice::fuzzing::otlp_logs);
}

#[test]
fn config_toml_corpus() {
    replay("config_toml", sluice::fuzzing::config_toml);
}

/// The property `check-config` OK implies `serve` starts, over the seeds:
/// the good one really is accepted (so the replay reaches the router) and
/// the configurations that crashed `serve` really are refused.
#[test]
fn config_serve_corpus() {
    replay("config_serve", sluice::fuzzing::config_serve);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config_serve");
    let validate = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        sluice::config::Config::from_toml(&text).unwrap().validate()
    };
    validate("seed-good-routes.toml").unwrap();
    let settings = |name: &str| {
        let seed = std::fs::read(dir.join(name)).unwrap();
        sluice::fuzzing::settings_config(&String::from_utf8_lossy(&seed[1..])).validate()
    };
    settings("seed-settings-good").unwrap();
    let e = settings("seed-settings-crash").unwrap_err().to_string();
    assert!(e.contains("streams.s0.routes: \"/:id\""), "{e}");
    for crash in [
        "seed-crash-route-colon.toml",
        "seed-crash-route-param.toml",
        "seed-useless-route-field-alias.toml",
        "seed-route-twice.toml",
    ] {
        let e = validate(crash).unwrap_err().to_string();
        assert!(
            e.contains("streams.api.routes") || e.contains("streams.web.routes"),
            "{crash}: {e}"
        );
    }
}
