//! A powercut-fs mount driven through its command line, as its README
//! tells a harness to: `mount` in the background, `cut [--tear SEED]`,
//! `status`. The mount outlives every cut; it is unmounted on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why FUSE cannot be used here, if it cannot: powercut-fs needs
/// `/dev/fuse`, and root or the setuid `fusermount3` (Debian's fuse3).
pub fn fuse_unusable() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Some(format!("/dev/fuse: {e}"));
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    let fusermount = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()));
    if !root && !fusermount {
        return Some("not root and no fusermount3 on PATH (Debian package fuse3)".into());
    }
    None
}

/// What the cuts of one mount did, summed over the `key=value` answers of
/// `powercut-fs cut` (files_reverted, pages_dropped, pages_kept,
/// dirs_reverted, handles_closed), plus the number of cuts and of tears.
#[derive(Default, Debug, Clone)]
pub struct CutTally {
    pub cuts: u64,
    pub tears: u64,
    pub effects: BTreeMap<String, u64>,
}

impl CutTally {
    pub fn add(&mut self, other: &CutTally) {
        self.cuts += other.cuts;
        self.tears += other.tears;
        for (k, v) in &other.effects {
            *self.effects.entry(k.clone()).or_default() += v;
        }
    }

    pub fn effect(&self, key: &str) -> u64 {
        self.effects.get(key).copied().unwrap_or(0)
    }
}

pub struct Mount {
    bin: PathBuf,
    pub mnt: PathBuf,
    socket: PathBuf,
    child: Child,
    pub tally: CutTally,
}

impl Mount {
    /// Mounts a fresh `root/backing` at `root/mnt`; the control socket and
    /// powercut-fs's own log stay in `root`, outside the mount.
    pub fn new(bin: &Path, root: &Path) -> Result<Mount, String> {
        let (backing, mnt, socket) = (
            root.join("backing"),
            root.join("mnt"),
            root.join("pcfs.sock"),
        );
        for d in [&backing, &mnt] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let log = std::fs::File::create(root.join("powercut-fs.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .arg("mount")
            .arg(&backing)
            .arg(&mnt)
            .arg("--control")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        // The socket answers once the mount is live; the deadline only
        // bounds a mount that never comes up.
        let t0 = Instant::now();
        loop {
            if control(bin, &socket, &["status"]).is_ok() {
                return Ok(Mount {
                    bin: bin.to_owned(),
                    mnt,
                    socket,
                    child,
                    tally: CutTally::default(),
                });
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || t0.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(root.join("powercut-fs.log")).unwrap_or_default();
                return Err(format!(
                    "the powercut-fs mount did not come up ({exited:?}): {log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A power cut: what was not fsynced vanishes (or, with `tear`, a
    /// random subset of the unsynced pages survives). Every process using
    /// the mount must be dead and reaped first. An error leaves the mount
    /// unusable: the caller stops.
    pub fn cut(&mut self, tear: Option<u64>) -> Result<String, String> {
        let seed = tear.map(|s| s.to_string());
        let answer = match &seed {
            None => control(&self.bin, &self.socket, &["cut"])?,
            Some(s) => control(&self.bin, &self.socket, &["cut", "--tear", s])?,
        };
        self.tally.cuts += 1;
        self.tally.tears += u64::from(tear.is_some());
        for (k, v) in answer
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
        {
            if let Ok(v) = v.parse::<u64>() {
                *self.tally.effects.entry(k.to_string()).or_default() += v;
            }
        }
        Ok(answer)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*self.mnt.to_string_lossy()));
        if mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Runs `powercut-fs COMMAND SOCKET ARGS...`; its `ok ...` line, or why not.
fn control(bin: &Path, socket: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .arg(args[0])
        .arg(socket)
        .args(&args[1..])
        .output()
        .map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && answer.starts_with("ok") {
        Ok(answer)
    } else {
        Err(format!(
            "powercut-fs {}: {answer} {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
