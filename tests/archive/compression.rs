//! Sealing an hour compresses its file, and a late event decompresses it:
//! both are streamed, so a large hour never sits in memory whole (issue 26
//! item 4: a 394 MB hour took RSS from 40 to 532 MiB with `encode_all` and
//! `decode_all`). A real `sluice serve` child with the files sink; the peak
//! RSS (VmHWM) is read from /proc before and after.

use super::*;

fn vm_hwm_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn wait_for(what: &str, d: &support::Daemon, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{what}; the log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sealing_and_reopening_a_large_hour_streams_the_compression() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("archive"));
    let d = files_sink(
        tmp.path(),
        &data,
        &dir,
        "idle-close-secs = 1\ncompress = true\n",
    )
    .start();
    let pid = d.pid();
    // 48 MiB into hour 10, in 1 MiB requests sent one after the other (the
    // ingest path's own peak stays small).
    let blob: String = (0..100_000u32)
        .map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26))
        .collect();
    for r in 0..48 {
        let events: Vec<Value> = (0..10)
            .map(|i| {
                json!({"id": format!("big-{r}-{i}"), "tenant_id": "t", "source": "s",
                "message": "m", "timestamp": "2026-11-26T10:00:00Z", "blob": blob})
            })
            .collect();
        assert_eq!(
            post(&d.addr, "application/json", &json!(events).to_string()),
            202
        );
    }
    let plain = dir.join("logs/2026-11-26/10.log.json");
    wait_for("hour 10 written", &d, || {
        std::fs::metadata(&plain).is_ok_and(|m| m.len() > 48_000_000)
    });
    let before = vm_hwm_kb(&pid);
    // An event of another hour after the idle time: the commit seals hour
    // 10 and compresses it.
    std::thread::sleep(Duration::from_millis(1500));
    let one = json!([{"id": "later", "tenant_id": "t", "source": "s", "message": "m",
        "timestamp": "2026-11-26T11:00:00Z"}]);
    assert_eq!(post(&d.addr, "application/json", &one.to_string()), 202);
    let zst = dir.join("logs/2026-11-26/10.log.json.zst");
    wait_for("hour 10 compressed", &d, || zst.exists() && !plain.exists());
    // A late event for hour 10: back to plain, then appended.
    let late = json!([{"id": "late", "tenant_id": "t", "source": "s", "message": "m",
        "timestamp": "2026-11-26T10:30:00Z"}]);
    assert_eq!(post(&d.addr, "application/json", &late.to_string()), 202);
    wait_for("hour 10 decompressed and appended", &d, || {
        std::fs::read(&plain)
            .is_ok_and(|b| b.ends_with(b"\n") && b.windows(6).any(|w| w == b"\"late\""))
    });
    let after = vm_hwm_kb(&pid);
    eprintln!("VmHWM {before} kB after ingest, {after} kB after compress and decompress");
    assert!(
        after < before + 24 * 1024,
        "compressing and decompressing a 48 MiB hour raised the peak RSS from {before} to {after} kB"
    );
    // The idle hour may be sealed (compressed) again by now.
    let text = match std::fs::read(&plain) {
        Ok(b) => b,
        Err(_) => zstd::stream::decode_all(std::fs::File::open(&zst).unwrap()).unwrap(),
    };
    let lines = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(lines, 481, "every line kept through both conversions");
}
