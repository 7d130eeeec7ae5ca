//! The power-cut model, checked through a real FUSE mount: each test mounts
//! `powercut-fs` over a fresh backing directory, does file operations on the
//! mount with ordinary system calls, cuts the power and looks at what is left,
//! through the mount and in the backing directory.
//! (Fixture and skip rules: tests/common/mod.rs.)

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;

use common::{fsync_dir, read, rw, Mount, PAGE};

#[test]
fn a_write_without_fsync_is_gone_after_a_cut() {
    let Some(m) = Mount::new() else { return };
    m.durable("f", b"old bytes");
    let f = rw(&m.m("f"));
    f.write_all_at(b"NEW", 0).unwrap();
    f.write_all_at(b" and more", 9).unwrap();
    assert_eq!(
        read(&m.m("f")),
        b"NEW bytes and more",
        "before the cut the page cache view"
    );
    drop(f);
    m.cut(None);
    assert_eq!(read(&m.m("f")), b"old bytes");
    assert_eq!(
        read(&m.backing.join("f")),
        b"old bytes",
        "the backing directory holds the durable state"
    );
}

#[test]
fn a_write_with_fsync_stays() {
    let Some(m) = Mount::new() else { return };
    m.durable("f", b"old bytes");
    let f = rw(&m.m("f"));
    f.write_all_at(b"NEW bytes, synced", 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(b"XXX", 0).unwrap();
    m.cut(None);
    assert_eq!(read(&m.m("f")), b"NEW bytes, synced");
}

#[test]
fn fdatasync_keeps_data_and_size_and_an_fsync_on_another_fd_counts() {
    let Some(m) = Mount::new() else { return };
    m.durable("f", b"0123");
    let writer = rw(&m.m("f"));
    writer.write_all_at(b"456789", 4).unwrap();
    writer.sync_data().unwrap();
    writer.write_all_at(b"abc", 10).unwrap();
    File::open(m.m("f")).unwrap().sync_data().unwrap();
    writer.write_all_at(b"lost", 13).unwrap();
    m.cut(None);
    assert_eq!(read(&m.m("f")), b"0123456789abc");
}

#[test]
fn sync_file_range_makes_nothing_durable() {
    let Some(m) = Mount::new() else { return };
    m.durable("db", &[b'a'; 2 * PAGE]);
    let f = rw(&m.m("db"));
    f.write_all_at(&[b'b'; 3 * PAGE], 0).unwrap();
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // As sled 0.34 does after each log write.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 3 * PAGE as i64, flags) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    m.cut(None);
    assert_eq!(read(&m.m("db")), vec![b'a'; 2 * PAGE]);
}

#[test]
fn a_new_file_is_gone_unless_its_directory_was_fsynced() {
    let Some(m) = Mount::new() else { return };
    m.synced("kept", b"data");
    fsync_dir(&m.mnt);
    let mut f = File::create(m.m("empty")).unwrap();
    f.write_all(b"data never fsynced").unwrap();
    fsync_dir(&m.mnt);
    m.synced("lost", b"data");
    m.cut(None);
    assert!(!m.m("lost").exists());
    assert_eq!(read(&m.m("kept")), b"data");
    assert_eq!(
        read(&m.m("empty")),
        b"",
        "the name is durable, the data is not"
    );
}

#[test]
fn a_rename_without_a_directory_fsync_is_undone_and_the_old_target_returns() {
    let Some(m) = Mount::new() else { return };
    m.durable("current", b"version 1");
    m.durable("moved", b"moved");
    m.synced("current.tmp", b"version 2");
    fs::rename(m.m("current.tmp"), m.m("current")).unwrap();
    fs::rename(m.m("moved"), m.m("elsewhere")).unwrap();
    assert_eq!(read(&m.m("current")), b"version 2");
    m.cut(None);
    assert_eq!(read(&m.m("current")), b"version 1");
    assert_eq!(read(&m.m("moved")), b"moved");
    assert!(
        !m.m("current.tmp").exists(),
        "the temp file was never durably named"
    );
    assert!(!m.m("elsewhere").exists());
    assert!(m.status().contains("buried=0"), "{}", m.status());
}

#[test]
fn a_rename_with_a_directory_fsync_stays() {
    let Some(m) = Mount::new() else { return };
    fs::create_dir(m.m("d")).unwrap();
    fsync_dir(&m.mnt);
    m.durable("d/current", b"version 1");
    m.synced("d/current.tmp", b"version 2");
    fs::rename(m.m("d/current.tmp"), m.m("d/current")).unwrap();
    fsync_dir(&m.m("d"));
    assert!(
        m.status().contains("buried=0"),
        "the replaced inode is released: {}",
        m.status()
    );
    m.cut(None);
    assert_eq!(read(&m.m("d/current")), b"version 2");
    assert!(!m.m("d/current.tmp").exists());
}

#[test]
fn an_unlink_without_a_directory_fsync_is_undone() {
    let Some(m) = Mount::new() else { return };
    m.durable("segment-1", b"records");
    m.durable("segment-2", b"more records");
    fs::remove_file(m.m("segment-1")).unwrap();
    fs::remove_file(m.m("segment-2")).unwrap();
    fsync_dir(&m.mnt);
    m.durable("segment-3", b"x");
    fs::remove_file(m.m("segment-3")).unwrap();
    assert!(!m.m("segment-1").exists());
    m.cut(None);
    assert!(
        !m.m("segment-1").exists(),
        "the directory fsync made the removal durable"
    );
    assert!(!m.m("segment-2").exists());
    assert_eq!(read(&m.m("segment-3")), b"x");
}

#[test]
fn a_truncate_or_fallocate_without_fsync_is_undone() {
    let Some(m) = Mount::new() else { return };
    let durable: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    m.durable("shrunk", &durable);
    m.durable("grown", &durable);
    let f = rw(&m.m("shrunk"));
    f.set_len(100).unwrap();
    f.write_all_at(b"tail", 100).unwrap();
    let g = rw(&m.m("grown"));
    let r = unsafe { libc::fallocate(g.as_raw_fd(), 0, 0, 1 << 20) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(fs::metadata(m.m("grown")).unwrap().len(), 1 << 20);
    m.cut(None);
    assert_eq!(read(&m.m("shrunk")), durable);
    assert_eq!(read(&m.m("grown")), durable);
}

/// Writes 16 pages of `b` over 8 durable pages of `a`, then tears.
fn torn(seed: u64) -> Vec<u8> {
    let m = Mount::new().expect("checked by the caller");
    m.durable("wal", &[b'a'; 8 * PAGE]);
    let f = rw(&m.m("wal"));
    for page in 0..16 {
        f.write_all_at(&[b'b'; PAGE], (page * PAGE) as u64).unwrap();
    }
    let answer = m.cut(Some(seed));
    assert!(answer.contains("pages_kept="), "{answer}");
    read(&m.m("wal"))
}

#[test]
fn a_torn_cut_keeps_a_subset_of_the_pages_decided_by_the_seed() {
    if Mount::new().is_none() {
        return;
    }
    let first = torn(7);
    assert_eq!(first, torn(7), "the same seed tears the same way");
    assert_ne!(first, torn(8), "another seed tears another way");
    assert!(first.len() >= 8 * PAGE && first.len() <= 16 * PAGE);
    let pages: Vec<u8> = first
        .chunks(PAGE)
        .map(|p| {
            assert!(
                p.iter().all(|b| *b == p[0]),
                "a page is kept or dropped whole"
            );
            p[0]
        })
        .collect();
    for (i, p) in pages.iter().enumerate() {
        let allowed: &[u8] = if i < 8 { b"ab" } else { b"b\0" };
        assert!(allowed.contains(p), "page {i} holds {p}");
    }
    assert!(pages.contains(&b'a') && pages.contains(&b'b'), "{pages:?}");
}

#[test]
fn a_mkdir_without_a_parent_fsync_vanishes_with_its_content() {
    let Some(m) = Mount::new() else { return };
    fs::create_dir_all(m.m("kept/sub")).unwrap();
    fsync_dir(&m.mnt);
    fsync_dir(&m.m("kept"));
    m.durable("kept/sub/f", b"f");
    fs::create_dir(m.m("lost")).unwrap();
    m.durable("lost/f", b"durable inside a directory that is not");
    m.cut(None);
    assert!(!m.m("lost").exists());
    assert_eq!(read(&m.m("kept/sub/f")), b"f");
}

#[test]
fn an_rmdir_without_a_parent_fsync_is_undone() {
    let Some(m) = Mount::new() else { return };
    fs::create_dir(m.m("d")).unwrap();
    fsync_dir(&m.mnt);
    m.durable("d/f", b"f");
    fs::remove_file(m.m("d/f")).unwrap();
    fs::remove_dir(m.m("d")).unwrap();
    m.cut(None);
    assert_eq!(read(&m.m("d/f")), b"f", "neither removal was made durable");
}

#[test]
fn sled_style_snapshot_rotation_without_directory_fsync_keeps_the_old_snapshot() {
    let Some(m) = Mount::new() else { return };
    m.durable("snap.0001", b"old snapshot");
    // sled 0.34: write snap.N.generating, fsync, rename, remove the old one;
    // no directory fsync.
    m.synced("snap.0002.generating", b"new snapshot");
    fs::rename(m.m("snap.0002.generating"), m.m("snap.0002")).unwrap();
    fs::remove_file(m.m("snap.0001")).unwrap();
    m.cut(None);
    let mut names: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["snap.0001"]);
    assert_eq!(read(&m.m("snap.0001")), b"old snapshot");
}

#[test]
fn a_handle_from_before_a_cut_fails_and_the_killed_writers_files_reopen() {
    let Some(m) = Mount::new() else { return };
    m.durable("LOCK", b"");
    m.durable("log", b"durable\n");
    let stale = rw(&m.m("log"));
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg("printf 'unsynced\\n' >&3; exec sleep 1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_with_fd3(&m.m("log"));
    // Wait for the write, through the mount.
    while read(&m.m("log")) != b"durable\nunsynced\n" {
        assert!(writer.try_wait().unwrap().is_none(), "the writer died");
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.kill().unwrap();
    writer.wait().unwrap();
    m.cut(None);
    assert_eq!(
        stale.write_at(b"x", 0).unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    assert_eq!(read(&m.m("log")), b"durable\n");
    let f = rw(&m.m("log"));
    f.write_all_at(b"restarted\n", 8).unwrap();
    assert_eq!(read(&m.m("log")), b"durable\nrestarted\n");
}

trait SpawnWithFd3 {
    fn spawn_with_fd3(&mut self, path: &Path) -> Child;
}

impl SpawnWithFd3 for Command {
    /// Spawns with `path` opened for appending as descriptor 3.
    fn spawn_with_fd3(&mut self, path: &Path) -> Child {
        use std::os::unix::process::CommandExt;
        let file = OpenOptions::new().append(true).open(path).unwrap();
        let fd = file.as_raw_fd();
        unsafe {
            self.pre_exec(move || {
                // dup2 onto itself would keep O_CLOEXEC.
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = self.spawn().unwrap();
        drop(file);
        child
    }
}

#[test]
fn locks_o_append_o_direct_and_statvfs_work_on_the_mount() {
    let Some(m) = Mount::new() else { return };
    m.durable("LOCK", b"");
    let a = File::open(m.m("LOCK")).unwrap();
    let b = File::open(m.m("LOCK")).unwrap();
    assert_eq!(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    assert_eq!(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        -1
    );
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EWOULDBLOCK)
    );
    drop(a);
    assert_eq!(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );

    m.durable("appended", b"one\n");
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.m("appended"))
        .unwrap();
    f.write_all(b"two\n").unwrap();
    f.write_all(b"three\n").unwrap();
    assert_eq!(read(&m.m("appended")), b"one\ntwo\nthree\n");

    let mut direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.m("appended"))
        .expect("O_DIRECT opens work on the mount");
    let mut buf = Vec::new();
    direct.read_to_end(&mut buf).unwrap();
    assert_eq!(
        buf, b"one\ntwo\nthree\n",
        "a direct read sees the unsynced bytes, as on Linux"
    );

    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        let p = std::ffi::CString::new(m.mnt.as_os_str().to_str().unwrap()).unwrap();
        assert_eq!(libc::statvfs(p.as_ptr(), &mut st), 0);
        st
    };
    assert!(st.f_blocks > 0 && st.f_bsize > 0);

    m.cut(None);
    assert_eq!(read(&m.m("appended")), b"one\n");
}

#[test]
fn the_model_directory_is_hidden_and_reserved() {
    let Some(m) = Mount::new() else { return };
    assert!(m.backing.join(".powercut-fs").is_dir());
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);
    let err = fs::create_dir(m.m(".powercut-fs")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
}

#[test]
fn a_hard_link_needs_its_directory_fsynced_and_shares_the_inode() {
    use std::os::unix::fs::MetadataExt;
    let Some(m) = Mount::new() else { return };
    m.durable("a", b"shared");
    fs::create_dir(m.m("d")).unwrap();
    fsync_dir(&m.mnt);
    fs::hard_link(m.m("a"), m.m("lost-link")).unwrap();
    fs::hard_link(m.m("a"), m.m("d/kept-link")).unwrap();
    fsync_dir(&m.m("d"));
    assert_eq!(fs::metadata(m.m("a")).unwrap().nlink(), 3);
    m.cut(None);
    assert!(!m.m("lost-link").exists());
    let (a, b) = (
        fs::metadata(m.m("a")).unwrap(),
        fs::metadata(m.m("d/kept-link")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one inode, two names");
    let backing = (
        fs::metadata(m.backing.join("a")).unwrap(),
        fs::metadata(m.backing.join("d/kept-link")).unwrap(),
    );
    assert_eq!(backing.0.ino(), backing.1.ino());
}

#[test]
fn sync_makes_everything_durable() {
    let Some(m) = Mount::new() else { return };
    fs::create_dir_all(m.m("a/b")).unwrap();
    fs::write(m.m("a/b/f"), b"never fsynced").unwrap();
    assert!(m.control("sync").unwrap().starts_with("ok"));
    assert!(
        m.status().contains("dirty_files=0 dirty_dirs=0"),
        "{}",
        m.status()
    );
    m.cut(None);
    assert_eq!(read(&m.m("a/b/f")), b"never fsynced");
}

#[test]
fn a_file_unlinked_while_open_and_then_written_comes_back_with_its_durable_bytes() {
    let Some(m) = Mount::new() else { return };
    m.durable("segment", b"durable records");
    let f = rw(&m.m("segment"));
    fs::remove_file(m.m("segment")).unwrap();
    f.write_all_at(b"OVERWRITTEN", 0).unwrap();
    f.set_len(5).unwrap();
    let mut back = [0u8; 5];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"OVERW", "the open, unlinked file keeps working");
    assert!(m.status().contains("buried=1"), "{}", m.status());
    m.cut(None);
    assert_eq!(read(&m.m("segment")), b"durable records");
}
