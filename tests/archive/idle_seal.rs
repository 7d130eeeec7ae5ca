//! A quiet topic still seals its hours: with `idle-close-secs = 2` and
//! `compress = true`, an hour with no new record is sealed (its summary
//! final, its file compressed) within a few seconds, not when the next
//! record happens to arrive (issue 26 item 6: 27 s open with no traffic).

use super::*;

#[test]
fn idle_hours_are_sealed_on_a_timer_without_new_records() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(tmp.path(), Some(1));
    let cfg = config(tmp.path(), "compress = true");
    // `config` sets idle-close-secs = 1.
    let dir = tmp.path().join("a");
    let a = Archiver::start(&dir, &broker.addr, "idle", &cfg);
    let mut src = Source::new(&broker.addr, "idle-i");
    for seq in 1..=5u64 {
        let v = json!({"id": format!("e{seq}"), "tenant_id": "t", "timestamp": "2026-11-26T10:00:00Z",
            "severity": "INFO", "source": "s", "message": "m", "path": "/p"});
        src.send(seq, 0, v.to_string().as_bytes());
    }
    src.flush();
    let plain = dir.join("logs/2026-11-26/10.log.json");
    let zst = dir.join("logs/2026-11-26/10.log.json.zst");
    let t0 = Instant::now();
    while !plain.exists() && !zst.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "nothing archived");
        std::thread::sleep(Duration::from_millis(100));
    }
    // No more records: the hour must be sealed and compressed by itself.
    let t0 = Instant::now();
    while !zst.exists() || plain.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "hour still open {:?} after the last record",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = zstd::stream::decode_all(std::fs::File::open(&zst).unwrap()).unwrap();
    assert_eq!(
        text.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        5
    );
    a.stop();
}
