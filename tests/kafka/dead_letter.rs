//! The dead-letter file on real files: a partial last line (ENOSPC, a kill
//! mid-write) never swallows the next record, and the directory entry of a
//! file this process did not create is synced before the record counts.

use std::process::Command;

use sluice::replay::dead_letter::DeadLetterFile;

use super::event;

const CHILD_DIR: &str = "SLUICE_TEST_DEAD_LETTER_DIR";

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("unparseable line {l:?}: {e}")))
        .collect()
}

#[test]
fn a_partial_last_line_is_cut_before_the_next_append_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let file = DeadLetterFile::new(dir.path());
    file.append(7, "events", "too large", &event("dl", "a", 7, 0))
        .unwrap();
    // What ENOSPC or a kill in the middle of the next write leaves behind.
    let partial = br#"{"seq":8,"topic":"events","error":"too la"#;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(file.path())
        .unwrap();
    std::io::Write::write_all(&mut f, partial).unwrap();
    drop(f);

    // A new process (a fresh DeadLetterFile) writes seq 8 again.
    let file = DeadLetterFile::new(dir.path());
    let appended = file
        .append(8, "events", "too large", &event("dl", "a", 8, 0))
        .unwrap();
    assert_eq!(appended.truncated_partial, partial.len() as u64);
    let seqs: Vec<_> = lines(file.path())
        .iter()
        .map(|l| l["seq"].clone())
        .collect();
    assert_eq!(seqs, [7, 8]);
    // Nothing to cut the next time.
    let appended = file
        .append(9, "events", "too large", &event("dl", "a", 9, 0))
        .unwrap();
    assert_eq!(appended.truncated_partial, 0);
    assert_eq!(lines(file.path()).len(), 3);
}

#[test]
fn a_partial_last_line_is_cut_at_start_even_without_a_new_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let file = DeadLetterFile::new(dir.path());
    assert_eq!(file.repair_tail().unwrap(), 0, "no file, no work");
    file.append(1, "events", "too large", &event("dl", "a", 1, 0))
        .unwrap();
    let whole = std::fs::metadata(file.path()).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(file.path())
        .unwrap();
    std::io::Write::write_all(&mut f, br#"{"seq":2,"to"#).unwrap();
    drop(f);
    let file = DeadLetterFile::new(dir.path());
    assert_eq!(file.repair_tail().unwrap(), 12);
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), whole);
    assert_eq!(lines(file.path()).len(), 1);
}

/// Run by the test below under strace: one append to an existing file.
#[test]
#[ignore = "child process of the_directory_is_synced_for_a_file_an_earlier_process_created"]
fn child_appends_once() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    DeadLetterFile::new(std::path::Path::new(&dir))
        .append(2, "events", "too large", &event("dl", "a", 2, 0))
        .unwrap();
}

#[test]
fn the_directory_is_synced_for_a_file_an_earlier_process_created() {
    let strace = Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !strace {
        eprintln!("SKIPPED: strace is not available (or ptrace is not permitted)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // An earlier process created the file, wrote and fdatasynced a line, and
    // died before it synced the directory (it is not ours to know which).
    let path = dir.path().join("dead-letter/dead-letter.ndjson");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"{\"seq\":1}\n").unwrap();
    let trace = dir.path().join("trace");
    let status = Command::new("strace")
        .args(["-f", "-y", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(std::env::current_exe().unwrap())
        .args([
            "dead_letter::child_appends_once",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(lines(&path).len(), 2, "the child appended");
    let trace = std::fs::read_to_string(&trace).unwrap();
    let file_sync = trace
        .lines()
        .position(|l| l.contains("fdatasync(") && l.contains("dead-letter.ndjson>"))
        .unwrap_or_else(|| panic!("no fdatasync of the file:\n{trace}"));
    let dir_sync = trace
        .lines()
        .position(|l| l.contains("fsync(") && l.contains("/dead-letter>") && l.contains("= 0"));
    assert!(
        dir_sync.is_some_and(|d| d > file_sync),
        "the directory must be fsynced after the line:\n{trace}"
    );
}

/// A process died after creating `dead-letter/` and before fsyncing the data
/// dir: the directory's entry may not survive a power cut, and neither would
/// any line later written into it. The next start must fsync the data dir
/// (traced: `fsync(<data dir>)`), even though the file was never created.
#[test]
fn a_dead_letter_dir_left_by_a_killed_process_gets_its_entry_fsynced_at_start() {
    if !super::offsets::strace_available() {
        eprintln!("SKIPPED: strace is not available (or ptrace is not permitted)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = super::daemon::Broker::start(dir.path(), Some(1));
    let d = super::daemon::serve(&data, &broker.addr, &[], &[]);
    super::daemon::wait_committed(&d, 0);
    assert!(d.stop().success());
    std::fs::create_dir(data.join("dead-letter")).unwrap();
    let trace = dir.path().join("trace");
    let trace_arg = trace.to_str().unwrap().to_string();
    let d = super::daemon::serve(
        &data,
        &broker.addr,
        &[],
        &[
            "strace",
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=fsync",
            "-o",
            &trace_arg,
        ],
    );
    super::daemon::wait_committed(&d, 0);
    assert!(d.stop().success());
    let data_real = data.canonicalize().unwrap();
    let wanted = format!("<{}>)", data_real.display());
    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("fsync(") && l.contains(&wanted) && l.contains("= 0")),
        "no fsync of {} in the trace:\n{text}",
        data_real.display()
    );
}
