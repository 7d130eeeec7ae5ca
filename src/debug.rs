//! Debug-build-only pause hooks at the sites where a crash matters most, so
//! that the chaos harness's random SIGKILLs land inside those windows more
//! often. `SLUICE_DEBUG_PAUSE="commit=2,roll=20,gc=20,replay=1,flush=20"` sleeps that
//! many milliseconds at each named site. Release builds compile this to
//! nothing.

/// The sites, each between two steps whose order is an invariant.
#[derive(Debug, Clone, Copy)]
pub enum Site {
    /// Group commit: frames written, fdatasync not yet done.
    Commit = 0,
    /// Segment roll: renamed, directory not yet fsynced.
    Roll = 1,
    /// GC: offset flushed, segments not yet deleted.
    Gc = 2,
    /// Replay: a record produced, its delivery not yet settled.
    Replay = 3,
    /// Replay: deliveries confirmed, the offset not yet flushed.
    Flush = 4,
}

#[cfg(debug_assertions)]
pub fn pause(site: Site) {
    use std::sync::OnceLock;
    static PAUSES: OnceLock<[u64; 5]> = OnceLock::new();
    let pauses = PAUSES.get_or_init(|| {
        let mut p = [0u64; 5];
        if let Ok(spec) = std::env::var("SLUICE_DEBUG_PAUSE") {
            for part in spec.split(',') {
                let Some((name, ms)) = part.split_once('=') else {
                    continue;
                };
                let i = match name.trim() {
                    "commit" => 0,
                    "roll" => 1,
                    "gc" => 2,
                    "replay" => 3,
                    "flush" => 4,
                    _ => continue,
                };
                p[i] = ms.trim().parse().unwrap_or(0);
            }
        }
        p
    });
    let ms = pauses[site as usize];
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn pause(_site: Site) {}

/// Debug builds only: true when this fdatasync should fail with EIO, after
/// `SLUICE_DEBUG_FAIL_FSYNC_AFTER` successful ones. Lets a test make a real
/// daemon process meet a failed fsync.
#[cfg(debug_assertions)]
pub fn fail_fsync_now() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static AFTER: OnceLock<Option<u64>> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    match AFTER.get_or_init(|| {
        std::env::var("SLUICE_DEBUG_FAIL_FSYNC_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
    }) {
        Some(after) => SEEN.fetch_add(1, Ordering::Relaxed) >= *after,
        None => false,
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn fail_fsync_now() -> bool {
    false
}

/// Debug builds only: `SLUICE_DEBUG_FAIL_WAL_READS=N` makes the first N WAL
/// reads after [`arm_read_failures`] fail with EIO (recovery, which runs
/// before it is armed, reads normally). Lets a test make a real daemon meet
/// a read error in its start-up scans.
#[cfg(debug_assertions)]
static READS_ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(debug_assertions)]
pub fn arm_read_failures() {
    READS_ARMED.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn arm_read_failures() {}

#[cfg(debug_assertions)]
pub fn fail_read_now() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static COUNT: OnceLock<u64> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    if !READS_ARMED.load(Ordering::Relaxed) {
        return false;
    }
    let n = *COUNT.get_or_init(|| {
        std::env::var("SLUICE_DEBUG_FAIL_WAL_READS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    n > 0 && SEEN.fetch_add(1, Ordering::Relaxed) < n
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn fail_read_now() -> bool {
    false
}

/// Debug builds only: true when the directory fsync after renaming onto `to`
/// should fail with EIO. `SLUICE_DEBUG_FAIL_RENAME_SYNC="checkpoint@3"` fails
/// the third such fsync (1-based) for a target named `checkpoint`, once, and
/// no other. Lets a test make a real daemon meet a failed directory fsync
/// right after a checkpoint's rename, the page cache showing the new name.
#[cfg(debug_assertions)]
pub fn fail_rename_sync_now(to: &std::path::Path) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let Some((name, nth)) = SPEC.get_or_init(|| {
        let v = std::env::var("SLUICE_DEBUG_FAIL_RENAME_SYNC").ok()?;
        let (name, n) = v.rsplit_once('@')?;
        Some((name.to_string(), n.trim().parse().ok()?))
    }) else {
        return false;
    };
    if to.file_name().and_then(|n| n.to_str()) != Some(name.as_str()) {
        return false;
    }
    SEEN.fetch_add(1, Ordering::Relaxed) + 1 == *nth
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn fail_rename_sync_now(_to: &std::path::Path) -> bool {
    false
}

/// Debug builds only: `SLUICE_DEBUG_PARTITIONS_CAP=N` makes replay see at
/// most N partitions in every topic's metadata. librdkafka's mock cluster
/// cannot add partitions to a topic, so the chaos harness grows a topic
/// from sluice's point of view by restarting the daemon without the cap
/// (the broker's topic has the full count all along, which is what a real
/// CreatePartitions leaves).
#[cfg(debug_assertions)]
pub fn cap_partitions(live: i32) -> i32 {
    use std::sync::OnceLock;
    static CAP: OnceLock<Option<i32>> = OnceLock::new();
    match CAP.get_or_init(|| {
        std::env::var("SLUICE_DEBUG_PARTITIONS_CAP")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|c: &i32| *c > 0)
    }) {
        Some(cap) => live.min(*cap),
        None => live,
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn cap_partitions(live: i32) -> i32 {
    live
}
