//! The files sink against what its own disk state can do to it (issue 25
//! items 5, 5b and 9), each with a real `sluice serve` child:
//! - an event time that is year 10000 in UTC, then kill -9;
//! - a checkpoint whose entries this build cannot read;
//! - a failed directory fsync right after the checkpoint's rename;
//! - every directory it creates fsynced in its parent (strace) before the
//!   first commit that relies on it.

use super::*;

fn event(id: &str, field: &str, time: &str) -> Value {
    json!({"id": id, field: time, "tenant_id": "t", "source": "web",
           "severity": "INFO", "message": "m", "path": "/p"})
}

fn post_events(addr: &str, events: &[Value]) -> u16 {
    post(addr, "application/json", &json!(events).to_string())
}

/// Waits until every id is in the files (hourly or unparsed, where the id
/// is the raw value); panics with the daemon's log otherwise.
pub(super) fn wait_ids(dir: &Path, ids: &[&str], d: &support::Daemon) -> HashMap<String, u64> {
    let t0 = Instant::now();
    loop {
        let all = recount(dir).0;
        let found = |id: &&str| {
            all.contains_key(*id) || all.keys().any(|k| k.contains(&format!("\"id\":\"{id}\"")))
        };
        if ids.iter().all(found) {
            return all;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{ids:?} never reached the files; the log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn metric(addr: &str, name: &str) -> Option<u64> {
    let (_, text) = http_get(addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Waits until `name` reads `want` (counters are published after a commit,
/// a moment after its lines are visible).
pub(super) fn wait_metric(d: &support::Daemon, name: &str, want: u64) {
    let t0 = Instant::now();
    loop {
        let got = metric(&d.addr, name);
        if got == Some(want) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name} = {got:?}, want {want}; the log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn wait_ready(d: &support::Daemon) {
    let t0 = Instant::now();
    loop {
        let (code, body) = http_get(&d.addr, "/ready");
        if code == 200 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "/ready {code} {body}; the log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every file under `dir` whose path contains `needle`.
fn paths_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.to_string_lossy().contains(needle) {
                out.push(p.clone());
            }
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn an_event_time_outside_years_0000_to_9999_in_utc_goes_to_unparsed_and_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    // Hours stay open, so the checkpoint names them at the kill.
    let extra = "idle-close-secs = 3600\ntimestamp-field = \"event_time\"\n";
    let d = files_sink(tmp.path(), &data, &dir, extra).start();
    let events = [
        // Year 10000 in UTC; and year -1.
        event("far", "event_time", "9999-12-31T23:30:00-01:00"),
        event("early", "event_time", "0000-01-01T00:30:00+01:00"),
        event("n1", "event_time", "2026-11-26T12:00:00Z"),
    ];
    assert_eq!(post_events(&d.addr, &events), 202);
    wait_ids(&dir, &["far", "early", "n1"], &d);
    wait_metric(&d, "sluice_sink_unparsed_total", 2);
    d.kill_9();
    // Every later start opens the archive and keeps archiving.
    let d = files_sink(tmp.path(), &data, &dir, extra).start();
    assert_eq!(
        post_events(
            &d.addr,
            &[event("n2", "event_time", "2026-11-26T12:05:00Z")]
        ),
        202
    );
    let all = wait_ids(&dir, &["n2"], &d);
    wait_ready(&d);
    let far: Vec<_> = all.keys().filter(|k| k.contains("\"far\"")).collect();
    assert_eq!(far.len(), 1, "{all:?}");
    assert!(
        paths_containing(&dir, "10000").is_empty() && paths_containing(&dir, "-0001").is_empty(),
        "an hour outside 0000-9999 got a file"
    );
    let unparsed = std::fs::read_to_string(
        paths_containing(&dir.join("logs/unparsed"), ".json")
            .into_iter()
            .find(|p| p.is_file())
            .unwrap(),
    )
    .unwrap();
    assert!(unparsed.contains("years 0000-9999 in UTC"), "{unparsed}");
    assert!(d.stop().success());
    settle(&dir);
    let (all, _) = recount(&dir);
    assert_eq!(all.values().sum::<u64>(), 4, "{all:?}");
}

/// The JSON body of a checkpoint file (after its header line).
pub(super) fn checkpoint_body(path: &Path) -> Option<Value> {
    let bytes = std::fs::read(path).ok()?;
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    serde_json::from_slice(&bytes[nl + 1..]).ok()
}

/// Rewrites the checkpoint as format 1 (every open hour's counts inline in
/// `DIR/checkpoint`, as builds before issue 26 item 2 wrote it) with `edit`
/// applied to its JSON body, with a valid checksum: what an older build (or
/// another bug) left, not damage. The format-2 hour files stay behind in
/// `checkpoint.d/`, named by nothing.
pub(super) fn edit_checkpoint(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("checkpoint");
    let mut body = checkpoint_body(&path).unwrap();
    if let Some(body) = body.as_object_mut() {
        // Format 2: `hours` names each hour's file by generation.
        if body.remove("generation").is_some() {
            let hours = body["hours"].as_object_mut().unwrap();
            for (key, gen) in hours.iter_mut() {
                let file = dir.join(format!("checkpoint.d/{key}.{gen}.json"));
                *gen = checkpoint_body(&file).unwrap()["stats"].take();
            }
        }
    }
    edit(&mut body);
    let body = serde_json::to_vec(&body).unwrap();
    let mut out = format!(
        "sluice-archive-checkpoint 1 {:08x}\n",
        crc32fast::hash(&body)
    )
    .into_bytes();
    out.extend_from_slice(&body);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn a_checkpoint_entry_this_build_cannot_read_never_keeps_the_files_sink_down() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    let extra = "idle-close-secs = 3600\n";
    let ts = "timestamp";
    let d = files_sink(tmp.path(), &data, &dir, extra).start();
    assert_eq!(
        post_events(&d.addr, &[event("n1", ts, "2026-11-26T12:00:00Z")]),
        202
    );
    wait_ids(&dir, &["n1"], &d);
    // Committed: the checkpoint names the open hour.
    let t0 = Instant::now();
    while !std::fs::read_to_string(dir.join("checkpoint"))
        .unwrap_or_default()
        .contains("2026-11-26T12")
    {
        assert!(t0.elapsed() < WITHIN, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill_9();
    // What a build that let year 10000 through leaves: a committed line in
    // logs/+10000-01-01/00.log.json (and an uncommitted tail), its summary,
    // and checkpoint entries naming that hour and file. And hour 12's
    // counts under a key no build writes: they must come back from its file.
    let far = format!("{}\n", event("far", ts, "9999-12-31T23:30:00-01:00"));
    std::fs::create_dir_all(dir.join("logs/+10000-01-01")).unwrap();
    std::fs::write(
        dir.join("logs/+10000-01-01/00.log.json"),
        format!("{far}{{\"id\":\"uncommitted\""),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("analytics/+10000-01-01")).unwrap();
    std::fs::write(
        dir.join("analytics/+10000-01-01/summary_00.json"),
        json!({"total": 1, "bytes": far.len(), "by_tenant": {"counts": {"t": 1}}}).to_string(),
    )
    .unwrap();
    edit_checkpoint(&dir, |cp| {
        let h12 = cp["hours"]
            .as_object_mut()
            .unwrap()
            .remove("2026-11-26T12")
            .unwrap();
        cp["hours"]["+10000-01-01T00"] = h12.clone();
        cp["hours"]["2026-11-26 12h"] = h12;
        cp["files"]["logs/+10000-01-01/00.log.json"] = json!(far.len());
    });
    let d = files_sink(tmp.path(), &data, &dir, extra).start();
    // The open drops the three entries (and cuts the tail) first.
    wait_metric(&d, "sluice_sink_checkpoint_entries_dropped_total", 3);
    wait_ready(&d);
    assert_eq!(
        post_events(&d.addr, &[event("n2", ts, "2026-11-26T12:05:00Z")]),
        202
    );
    wait_ids(&dir, &["n2"], &d);
    // The committed line stays, the uncommitted tail is cut, and a copy of
    // the checkpoint is kept for the operator.
    assert_eq!(
        std::fs::read_to_string(dir.join("logs/+10000-01-01/00.log.json")).unwrap(),
        far
    );
    assert_eq!(paths_containing(&dir, "checkpoint.unreadable-").len(), 1);
    // And the next crash and start do not meet those entries again.
    d.kill_9();
    let d = files_sink(tmp.path(), &data, &dir, extra).start();
    wait_ready(&d);
    assert_eq!(
        post_events(&d.addr, &[event("n3", ts, "2026-11-26T12:10:00Z")]),
        202
    );
    wait_ids(&dir, &["n3"], &d);
    assert_eq!(
        metric(&d.addr, "sluice_sink_checkpoint_entries_dropped_total"),
        Some(0)
    );
    assert!(d.stop().success());
    // Hour 12's counts: rebuilt from its file (n1), then n2 and n3.
    settle(&dir);
    let (all, _) = recount(&dir);
    let mut ids: Vec<_> = all.into_iter().collect();
    ids.sort();
    let want: Vec<(String, u64)> = ["far", "n1", "n2", "n3"]
        .iter()
        .map(|s| (s.to_string(), 1))
        .collect();
    assert_eq!(ids, want);
    let s: Value = serde_json::from_slice(
        &std::fs::read(dir.join("analytics/2026-11-26/summary_12.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(s["total"], json!(3), "{s}");
}

#[test]
fn a_failed_directory_fsync_after_the_checkpoint_rename_stops_the_daemon_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    // The third checkpoint write (the first is the fresh directory's, then
    // one per commit) meets EIO on its directory fsync, after the rename:
    // the page cache shows the new checkpoint, the disk may not.
    let mut d = files_sink(tmp.path(), &data, &dir, "idle-close-secs = 1\n")
        .envs(&[("SLUICE_DEBUG_FAIL_RENAME_SYNC", "checkpoint@3")])
        .start();
    let (mut acked, mut unacked) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(15) {
        if d.child.try_wait().unwrap().is_some() {
            break;
        }
        let ids: Vec<String> = (0..5)
            .map(|_| {
                n += 1;
                format!("e-{n}")
            })
            .collect();
        let events: Vec<Value> = ids
            .iter()
            .map(|id| event(id, "timestamp", "2026-11-26T12:00:00Z"))
            .collect();
        if try_post(&d.addr, "application/json", &json!(events).to_string()) == 202 {
            acked.extend(ids);
        } else {
            unacked.extend(ids);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = d.log_text();
    // Reopening in the same process would read the page cache's checkpoint
    // and skip to it: the offset would then pass records that a power cut
    // takes out of the files.
    assert!(
        !log.contains("already in the archive's checkpoint"),
        "the sink reopened and trusted a checkpoint whose directory fsync failed:\n{log}"
    );
    let status = d.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!("the daemon kept running after a failed fsync of the checkpoint's directory:\n{log}")
    });
    assert!(!status.success(), "{status}");
    let log = d.log_text();
    assert!(log.contains("an fsync failed"), "{log}");
    assert!(!acked.is_empty());
    // The restart reads the disk: every acknowledged event exactly once.
    let d = files_sink_serve(tmp.path(), &data, &dir);
    wait_ready(&d);
    // One more, so that the writer has opened (and cut the files back to
    // the checkpoint the disk returned) before the count.
    assert_eq!(
        post_events(
            &d.addr,
            &[event("after", "timestamp", "2026-11-26T12:00:00Z")]
        ),
        202
    );
    acked.push("after".to_string());
    let refs: Vec<&str> = acked.iter().map(String::as_str).collect();
    let all = wait_ids(&dir, &refs, &d);
    let dup: Vec<_> = all.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dup.is_empty(), "duplicated: {dup:?}");
    assert!(all.keys().all(|k| acked.contains(k) || unacked.contains(k)));
    let log = d.log_text();
    let status = d.stop();
    assert!(status.success(), "{status}:\n{log}");
    settle(&dir);
}

/// One strace line: the syscall and its first path (from `-y` for fds).
fn strace_call(line: &str) -> Option<(&str, String)> {
    // `PID name(args...` with `-f`; `<... name resumed>` lines carry no path.
    let rest = line.split_once(' ').map(|(_, r)| r.trim_start())?;
    let (name, args) = rest.split_once('(')?;
    // `-y` decorates AT_FDCWD with the working directory: skip it.
    let args = match args.strip_prefix("AT_FDCWD") {
        Some(a) => a.split_once(", ")?.1,
        None => args,
    };
    let path = if let Some(a) = args.split_once('<') {
        // fsync(7</tmp/x/archive>)
        a.1.split_once('>')?.0.to_string()
    } else {
        args.split('"').nth(1)?.to_string()
    };
    Some((name, path))
}

/// As tests/kafka/offsets.rs: strace present and ptrace permitted.
fn strace_ok() -> bool {
    let ok = Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: strace is not available (or ptrace is not permitted)");
    }
    ok
}

/// `serve` under `strace -f -y` of the calls that order durability.
fn traced(serve: support::Serve, trace: &Path) -> support::Daemon {
    traced_calls(
        serve,
        trace,
        "openat,mkdir,mkdirat,fsync,fdatasync,rename,renameat,renameat2",
    )
}

/// `serve` under `strace -f -y -e trace=CALLS`.
fn traced_calls(serve: support::Serve, trace: &Path, calls: &str) -> support::Daemon {
    let out = trace.display().to_string();
    let filter = format!("trace={calls}");
    serve
        .wrapper(&["strace", "-f", "-y", "-qq", "-o", &out, "-e", &filter])
        .start()
}

#[test]
fn a_restart_fsyncs_the_archive_directory_before_it_trusts_the_checkpoint() {
    if !strace_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    let d = files_sink_serve(tmp.path(), &data, &dir);
    assert_eq!(
        post_events(&d.addr, &[event("a", "timestamp", "2026-11-26T12:00:00Z")]),
        202
    );
    wait_ids(&dir, &["a"], &d);
    // Killed right after a rename, the checkpoint's new name may be in the
    // page cache only; the next process must make it durable before it
    // skips records (and lets the WAL go) on its word.
    d.kill_9();
    let trace = tmp.path().join("strace.txt");
    let d = traced(
        files_sink(tmp.path(), &data, &dir, "idle-close-secs = 1\n"),
        &trace,
    );
    // The writer is open once a new event is in the files.
    assert_eq!(
        post_events(&d.addr, &[event("b", "timestamp", "2026-11-26T12:01:00Z")]),
        202
    );
    wait_ids(&dir, &["b"], &d);
    assert!(d.stop().success());
    let text = std::fs::read_to_string(&trace).unwrap();
    let archive = dir.display().to_string();
    let read = text
        .lines()
        .position(|l| {
            l.contains("openat(")
                && l.contains(&format!("\"{archive}/checkpoint\""))
                && l.contains("O_RDONLY")
        })
        .unwrap_or_else(|| panic!("the checkpoint was never read:\n{text}"));
    let synced = text
        .lines()
        .take(read)
        .any(|l| l.contains("fsync(") && l.contains(&format!("<{archive}>")));
    assert!(
        synced,
        "the checkpoint was read before any fsync of {archive}:\n{}",
        text.lines()
            .take(read + 1)
            .filter(|l| l.contains(&archive))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn every_directory_the_files_sink_creates_is_fsynced_in_its_parent_before_the_commit_that_needs_it()
{
    if !strace_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    let trace = tmp.path().join("strace.txt");
    // `event_time`: an event without one goes to logs/unparsed/.
    let extra = "idle-close-secs = 1\ntimestamp-field = \"event_time\"\n";
    let d = traced(files_sink(tmp.path(), &data, &dir, extra), &trace);
    assert_eq!(
        post_events(
            &d.addr,
            &[
                event("a", "event_time", "2026-11-26T12:00:00Z"),
                event("b", "event_time", "2026-11-27T08:00:00Z"),
                json!({"id": "u", "tenant_id": "t"}),
            ]
        ),
        202
    );
    wait_ids(&dir, &["a", "b", "u"], &d);
    // Idle hours seal: their summaries' directories and renames.
    let t0 = Instant::now();
    while !dir.join("analytics/2026-11-27/summary_08.json").exists() {
        assert!(t0.elapsed() < WITHIN, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(d.stop().success());
    let text = std::fs::read_to_string(&trace).unwrap();
    // (syscall, path, succeeded, a file created in the archive)
    let archive = dir.display().to_string();
    let calls: Vec<(&str, String, bool, bool)> = text
        .lines()
        .filter_map(|l| {
            let ok = l.ends_with("= 0") || l.contains("<unfinished ...>");
            let created = l.contains("O_CREAT") && !l.contains("= -1");
            strace_call(l).map(|(n, p)| {
                let new_file =
                    n == "openat" && created && p.starts_with(&archive) && !p.ends_with(".tmp");
                (n, p, ok, new_file)
            })
        })
        .collect();
    let root = tmp.path().display().to_string();
    let (mut checked, mut files) = (0, 0);
    let mut failures = Vec::new();
    for (i, (name, path, ok, new_file)) in calls.iter().enumerate() {
        let mkdir = (*name == "mkdir" || *name == "mkdirat") && *ok && path.starts_with(&root);
        if !mkdir && !new_file {
            continue;
        }
        let parent = Path::new(path).parent().unwrap().display().to_string();
        // The next commit after this mkdir: a rename onto `checkpoint`.
        let commit = calls[i..]
            .iter()
            .position(|(n, p, _, _)| {
                n.starts_with("rename") && p.ends_with(".tmp") && p.contains("checkpoint")
            })
            .map_or(calls.len(), |k| i + k);
        let synced = calls[i..commit]
            .iter()
            .any(|(n, p, _, _)| *n == "fsync" && *p == parent);
        if !synced {
            failures.push(format!(
                "{path}: parent {parent} not fsynced before the next checkpoint"
            ));
        }
        if *new_file {
            files += 1;
        } else {
            checked += 1;
        }
    }
    let quote: Vec<&str> = text
        .lines()
        .filter(|l| {
            (l.contains("mkdir") || l.contains("fsync(") || l.contains("rename"))
                && l.contains(&root)
                && !l.contains("/wal/")
        })
        .take(60)
        .collect();
    eprintln!("strace (first lines):\n{}", quote.join("\n"));
    assert!(checked >= 6, "only {checked} mkdirs traced:\n{text}");
    // a's and b's hourly files and u's unparsed file
    assert!(files >= 3, "only {files} archive files created:\n{text}");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Issue 26 item 2, the commit's order as the kernel saw it: a commit
/// after a line in one of two open hours writes that hour's checkpoint file
/// (tmp, fsync, rename, one fsync of `checkpoint.d/`), then the main file
/// (tmp, fsync, rename, fsync of the archive directory), and only then
/// unlinks the hour's previous generation; the other hour's file is not
/// touched.
#[test]
fn a_commit_writes_the_changed_hour_then_the_main_checkpoint_then_unlinks_the_old_generation() {
    if !strace_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    let trace = tmp.path().join("strace.txt");
    let d = traced_calls(
        files_sink(tmp.path(), &data, &dir, "idle-close-secs = 3600\n"),
        &trace,
        "openat,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat",
    );
    let main = dir.join("checkpoint");
    // The generation of each hour's file the main checkpoint names.
    let gens = || -> BTreeMap<String, u64> {
        let body = checkpoint_body(&main).unwrap_or_default();
        body["hours"]
            .as_object()
            .map(|h| {
                h.iter()
                    .map(|(k, g)| (k.clone(), g.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !done() {
            assert!(t0.elapsed() < WITHIN, "{what}: {}", d.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let events = [
        event("a", "timestamp", "2026-11-26T12:00:00Z"),
        event("b", "timestamp", "2026-11-26T13:00:00Z"),
    ];
    assert_eq!(post_events(&d.addr, &events), 202);
    wait_for("both hours committed", &|| gens().len() == 2);
    let first = gens();
    assert_eq!(
        post_events(&d.addr, &[event("c", "timestamp", "2026-11-26T12:05:00Z")]),
        202
    );
    wait_for("hour 12 committed again", &|| {
        gens().get("2026-11-26T12") != first.get("2026-11-26T12")
    });
    let second = gens();
    assert_eq!(second["2026-11-26T13"], first["2026-11-26T13"]);
    assert!(d.stop().success());

    let text = std::fs::read_to_string(&trace).unwrap();
    let archive = dir.display().to_string();
    let hours = format!("{archive}/checkpoint.d");
    let file = |h: &str, gen: u64| format!("{hours}/2026-11-26T{h}.{gen}.json");
    let (new, old) = (
        file("12", second["2026-11-26T12"]),
        file("12", first["2026-11-26T12"]),
    );
    let calls: Vec<(usize, &str, String)> = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| strace_call(l).map(|(n, p)| (i, n, p)))
        .collect();
    let find = |from: usize, what: &str, name: &dyn Fn(&str) -> bool, path: &str| {
        calls[from..]
            .iter()
            .position(|(_, n, p)| name(n) && p == path)
            .map(|k| from + k)
            .unwrap_or_else(|| panic!("no {what} of {path} after call {from}:\n{text}"))
    };
    let is = |want: &'static str| move |n: &str| n == want;
    let rename = |n: &str| n.starts_with("rename");
    let unlink = |n: &str| n.starts_with("unlink");
    // The order, each step after the one before it.
    let open = find(0, "open", &is("openat"), &format!("{new}.tmp"));
    let mut at = open;
    for (what, name, path) in [
        (
            "fsync",
            &is("fsync") as &dyn Fn(&str) -> bool,
            format!("{new}.tmp"),
        ),
        ("rename", &rename, format!("{new}.tmp")),
        ("fsync", &is("fsync"), hours.clone()),
        ("fsync", &is("fsync"), format!("{archive}/checkpoint.tmp")),
        ("rename", &rename, format!("{archive}/checkpoint.tmp")),
        ("fsync", &is("fsync"), archive.clone()),
        ("unlink", &unlink, old.clone()),
    ] {
        at = find(at + 1, what, name, &path);
    }
    // Hour 13's file is neither written nor removed by that commit.
    let h13 = format!("{hours}/2026-11-26T13.");
    let touched: Vec<&str> = calls[open..=at]
        .iter()
        .filter(|(_, _, p)| p.starts_with(&h13))
        .map(|(i, _, _)| text.lines().nth(*i).unwrap_or(""))
        .collect();
    assert!(touched.is_empty(), "{touched:#?}");
    let lines: Vec<&str> = text.lines().collect();
    let first_line = calls[open].0;
    let quote: Vec<&str> = lines[first_line..=calls[at].0]
        .iter()
        .filter(|l| l.contains(&archive) && !l.contains("/logs/") && !l.contains("/analytics"))
        .copied()
        .collect();
    eprintln!("strace of the commit:\n{}", quote.join("\n"));
}

#[test]
fn sluice_archive_takes_a_producer_time_past_year_9999_and_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path(), Some(1));
    let dir = tmp.path().join("archive");
    // Hours stay open: the checkpoint names them at the kill.
    let cfg = tmp.path().join("archive-open-hours.toml");
    std::fs::write(
        &cfg,
        "[archive]\ncommit-interval-ms = 150\nidle-close-secs = 3600\n\
         [archive.librdkafka]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
    )
    .unwrap();
    let mut src = Source::new(&broker.addr, "inst");
    let value = |id: &str, ts: &str| serde_json::to_vec(&event(id, "timestamp", ts)).unwrap();
    src.send(1, 0, &value("far", "9999-12-31T23:30:00-01:00"));
    src.send(2, 0, &value("n1", "2026-11-26T12:00:00Z"));
    src.flush();
    let mut a = Archiver::start(&dir, &broker.addr, "far", &cfg);
    a.wait_ready();
    let t0 = Instant::now();
    loop {
        let (_, m) = a.get("/metrics");
        let cp = std::fs::read_to_string(dir.join("checkpoint")).unwrap_or_default();
        if m.contains("sluice_archive_unparsed_total 1") && cp.contains("2026-11-26T12") {
            break;
        }
        assert!(t0.elapsed() < WITHIN, "{m}\n{cp}");
        std::thread::sleep(Duration::from_millis(100));
    }
    a.kill_9();
    src.send(3, 0, &value("n2", "2026-11-26T12:05:00Z"));
    src.flush();
    let mut a = Archiver::start(&dir, &broker.addr, "far", &cfg);
    a.wait_ready();
    let t0 = Instant::now();
    while !recount(&dir).0.contains_key("n2") {
        assert!(
            t0.elapsed() < WITHIN,
            "{}",
            std::fs::read_to_string(&a.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.stop().success());
    settle(&dir);
    let (all, _) = recount(&dir);
    assert_eq!(all.get("n1"), Some(&1));
    assert_eq!(all.keys().filter(|k| k.contains("\"far\"")).count(), 1);
    assert!(paths_containing(&dir, "10000").is_empty());
}

#[test]
fn a_start_on_a_new_archive_directory_says_which_delivered_records_it_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    let d = files_sink_serve(tmp.path(), &data, &dir);
    let events: Vec<Value> = (1..=3)
        .map(|i| event(&format!("x{i}"), "timestamp", "2026-11-26T12:00:00Z"))
        .collect();
    assert_eq!(post_events(&d.addr, &events), 202);
    wait_ids(&dir, &["x1", "x2", "x3"], &d);
    assert!(d.stop().success());
    // What a power cut did to an archive whose directory entry was never
    // fsynced: gone, while the WAL below the offset is deleted.
    std::fs::remove_dir_all(&dir).unwrap();
    let d = files_sink_serve(tmp.path(), &data, &dir);
    assert_eq!(
        post_events(&d.addr, &[event("x4", "timestamp", "2026-11-26T12:01:00Z")]),
        202
    );
    wait_ids(&dir, &["x4"], &d);
    wait_metric(&d, "sluice_sink_fresh_archive_records_total", 3);
    assert!(
        d.log_text().contains("the archive directory is new"),
        "{}",
        d.log_text()
    );
    assert!(d.stop().success());
}
