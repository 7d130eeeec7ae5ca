//! The fixture every model test uses: a powercut-fs mounted over a fresh
//! backing directory, unmounted on drop.
//!
//! Without a usable /dev/fuse the tests skip with a message, unless
//! POWERCUT_REQUIRE_FUSE=1 (CI), where they fail.
#![allow(dead_code)] // each test file uses a part

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_powercut-fs");
pub const PAGE: usize = 4096;

/// A mounted powercut-fs over a fresh backing directory, unmounted on drop.
pub struct Mount {
    root: PathBuf,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    socket: PathBuf,
    child: Child,
}

fn skip_or_fail(why: &str) -> Option<Mount> {
    if std::env::var("POWERCUT_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("FUSE is required (POWERCUT_REQUIRE_FUSE=1) but unusable: {why}");
    }
    eprintln!("SKIPPED: FUSE unusable here ({why}); set POWERCUT_REQUIRE_FUSE=1 to fail instead");
    None
}

fn fuse_unusable() -> Option<String> {
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Some(format!("/dev/fuse: {e}"));
    }
    let root = unsafe { libc::geteuid() } == 0;
    let fusermount = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()));
    if !root && !fusermount {
        return Some("not root and no fusermount3 on PATH (Debian package fuse3)".into());
    }
    None
}

fn is_mounted(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mnt = mnt.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*mnt))
}

impl Mount {
    pub fn new() -> Option<Mount> {
        if let Some(why) = fuse_unusable() {
            return skip_or_fail(&why);
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "powercut-model-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        let (backing, mnt, socket) = (
            root.join("backing"),
            root.join("mnt"),
            root.join("control.sock"),
        );
        fs::create_dir_all(&backing).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        let child = Command::new(BIN)
            .arg("mount")
            .arg(&backing)
            .arg(&mnt)
            .arg("--control")
            .arg(&socket)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Mount {
            root,
            backing,
            mnt,
            socket,
            child,
        };
        // The socket answers once the mount is live. The deadline only bounds
        // a mount that never comes up; nothing is judged by time.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if m.control("status").is_ok_and(|a| a.starts_with("ok")) {
                return Some(m);
            }
            if let Ok(Some(status)) = m.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = m.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return skip_or_fail(&format!("powercut-fs mount exited with {status}: {err}"));
            }
            assert!(Instant::now() < deadline, "the mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn control(&self, command: &str) -> std::io::Result<String> {
        use std::io::BufRead;
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket)?;
        s.write_all(format!("{command}\n").as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer)?;
        Ok(answer)
    }

    /// A cut through the command-line client, as a harness does it.
    pub fn cut(&self, tear: Option<u64>) -> String {
        let mut cmd = Command::new(BIN);
        cmd.arg("cut").arg(&self.socket);
        if let Some(seed) = tear {
            cmd.arg("--tear").arg(seed.to_string());
        }
        let out = cmd.output().unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cut failed: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer
    }

    pub fn status(&self) -> String {
        self.control("status").unwrap()
    }

    /// A path on the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Writes a file and fsyncs it; its name is not durable yet.
    pub fn synced(&self, rel: &str, bytes: &[u8]) {
        let mut f = File::create(self.m(rel)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    }

    /// Writes a file and makes it and its name durable.
    pub fn durable(&self, rel: &str, bytes: &[u8]) {
        self.synced(rel, bytes);
        fsync_dir(self.m(rel).parent().unwrap());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

pub fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}
