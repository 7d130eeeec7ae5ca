//! The few system calls std does not offer: `renameat2` flags, `fallocate`,
//! `statvfs`, `mknod`, `utimensat`. Errors are plain errno values, the
//! currency of FUSE replies.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// An errno value.
pub type Errno = i32;
pub type Res<T> = Result<T, Errno>;

/// The errno of an `io::Error`; EIO when it has none.
pub fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// `?`-friendly conversion of std results.
pub trait OrErrno<T> {
    fn or_errno(self) -> Res<T>;
}

impl<T> OrErrno<T> for io::Result<T> {
    fn or_errno(self) -> Res<T> {
        self.map_err(|e| errno(&e))
    }
}

fn last() -> Errno {
    errno(&io::Error::last_os_error())
}

fn cpath(p: &Path) -> Res<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)
}

/// `renameat2(2)` with its flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
pub fn rename(from: &Path, to: &Path, flags: u32) -> Res<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(last())
    } else {
        Ok(())
    }
}

/// `fallocate(2)` with any mode.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> Res<()> {
    let (off, len) = (
        i64::try_from(offset).map_err(|_| libc::EFBIG)?,
        i64::try_from(len).map_err(|_| libc::EFBIG)?,
    );
    // SAFETY: a valid open descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if r < 0 {
        Err(last())
    } else {
        Ok(())
    }
}

/// `statvfs(2)` of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> Res<libc::statvfs> {
    let p = cpath(path)?;
    // SAFETY: zeroed plain-old-data filled by the kernel.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: p is NUL-terminated, st is a valid out pointer.
    let r = unsafe { libc::statvfs(p.as_ptr(), &mut st) };
    if r < 0 {
        Err(last())
    } else {
        Ok(st)
    }
}

/// `mknod(2)`: FIFOs, sockets and device nodes.
pub fn mknod(path: &Path, mode: u32, rdev: u32) -> Res<()> {
    let p = cpath(path)?;
    // SAFETY: p is NUL-terminated.
    let r = unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, libc::dev_t::from(rdev)) };
    if r < 0 {
        Err(last())
    } else {
        Ok(())
    }
}

/// A time for [`utimens`]: leave it, set it to now, or to a given time.
pub enum Stamp {
    Omit,
    Now,
    At(SystemTime),
}

fn timespec(s: &Stamp) -> libc::timespec {
    let (sec, nsec) = match s {
        Stamp::Omit => (0, libc::UTIME_OMIT),
        Stamp::Now => (0, libc::UTIME_NOW),
        Stamp::At(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
            Err(e) => {
                let d = e.duration();
                (-(d.as_secs() as i64), i64::from(d.subsec_nanos()))
            }
        },
    };
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    }
}

/// `utimensat(2)` without following a final symlink.
pub fn utimens(path: &Path, atime: &Stamp, mtime: &Stamp) -> Res<()> {
    let p = cpath(path)?;
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: p is NUL-terminated and ts holds two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        Err(last())
    } else {
        Ok(())
    }
}

/// Blocks `signals` in the calling thread (and the threads it starts later).
pub fn block_signals(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of the blocked signals in `set`.
pub fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: set was built by block_signals; sig is a valid out pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Lazy unmount, for a mount that a plain unmount left busy.
pub fn detach(mountpoint: &Path) -> Res<()> {
    let p = cpath(mountpoint)?;
    // SAFETY: p is NUL-terminated.
    let r = unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    if r < 0 {
        Err(last())
    } else {
        Ok(())
    }
}

/// The effective user and group of this process.
pub fn euid_egid() -> (u32, u32) {
    // SAFETY: these calls cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}
