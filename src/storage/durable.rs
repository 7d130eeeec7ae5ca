//! Durable creation of directories and files on the real filesystem: the
//! one place that knows which fsyncs make a new name survive a power cut.
//!
//! A name is durable only once the directory holding it is fsynced; a file's
//! bytes only once the file is. So:
//! - [`create_dir_durable`]: every missing component is created top-down and,
//!   after each `mkdir`, the new directory and its parent are fsynced. A
//!   directory that already existed ends the walk (its own entry is someone
//!   else's business: the data dir's parent is the operator's).
//! - [`write_file_durable`]: `NAME.tmp`, write, fsync, rename onto `NAME`,
//!   fsync of the directory. Dying before the rename leaves the old file (and
//!   a `.tmp` the owner removes); after it, the new one.
//! - [`replace_file`]: the same without the directory fsync, for a caller
//!   that replaces many files in one directory and fsyncs it once.
//! - [`rename_durable`]: rename, then fsync of the target's directory (and of
//!   the source's, if it is another).
//!
//! Every fsync error comes back wrapped so that a caller can tell it from
//! other I/O errors ([`is_fsync_failure`]): after a failed fsync the page
//! cache may show what the disk does not hold, so what the process reads
//! back can no longer be trusted and the owner must stop (see
//! docs/design.md, "A failed fsync is sticky").

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An fsync (of a file or a directory) that failed; the cause is the source.
#[derive(Debug, thiserror::Error)]
#[error("fsync of {path} failed: {source}")]
pub struct FsyncFailed {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn fsync_failed(path: &Path, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        FsyncFailed {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// True when `e` (or what it wraps) is a failed fsync from this module.
pub fn is_fsync_failure(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<FsyncFailed>().is_some())
}

/// fsync of an open file (data and metadata).
pub fn sync_file(f: &File, path: &Path) -> io::Result<()> {
    f.sync_all().map_err(|e| fsync_failed(path, e))
}

/// fdatasync of an open file.
pub fn sync_file_data(f: &File, path: &Path) -> io::Result<()> {
    f.sync_data().map_err(|e| fsync_failed(path, e))
}

/// fsync of a directory: makes the creations, renames and removals inside
/// it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let f = File::open(dir)?;
    f.sync_all().map_err(|e| fsync_failed(dir, e))
}

fn parent_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Creates `dir` and every missing parent, durably: after each `mkdir` the
/// new directory and its parent are fsynced, top-down, so that when this
/// returns every directory it created survives a power cut, and files made
/// durable inside them later do too. Returns whether it created anything.
///
/// Dying between a `mkdir` and its parent's fsync leaves a directory that a
/// power cut may drop; nothing was put in it yet (callers create files only
/// after this returns). A later call finds it present and does not fsync
/// again: an owner that puts durable files into a directory that may come
/// from such a crash fsyncs its ancestors itself (the archive writer does,
/// for every new file, up to its root).
pub fn create_dir_durable(dir: &Path) -> io::Result<bool> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.as_os_str().is_empty() && std::fs::symlink_metadata(cur).is_err() {
        missing.push(cur);
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    let created = !missing.is_empty();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Another thread or process made it between our look and the
            // mkdir: its entry may not be durable yet; fsync as if ours.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // Dying here: `d` exists in the page cache only; nothing is in it.
        sync_dir(d)?;
        sync_dir(parent_of(d))?;
    }
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", dir.display()),
        ));
    }
    Ok(created)
}

/// Replaces `path` with `data`: `path.tmp`, write, fsync, rename, fsync of
/// the directory. When this returns Ok the new content survives a power
/// cut; if the process dies before the rename the old file is intact.
pub fn write_file_durable(path: &Path, data: &[u8]) -> io::Result<()> {
    write_file_durable_with(path, |f| f.write_all(data))
}

/// [`write_file_durable`] for content written as a stream (`write` fills
/// the new file), so a large file is never held in memory whole.
pub fn write_file_durable_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = write_tmp_synced(path, write)?;
    rename_durable(&tmp, path)
}

/// Replaces `path` with `data` (`path.tmp`, write, fsync, rename) without
/// the directory fsync: the bytes are durable, the name is not until the
/// caller fsyncs the directory, once for all the files it replaced there.
/// Dying before the rename leaves the old file (and a `.tmp`).
pub fn replace_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = write_tmp_synced(path, |f| f.write_all(data))?;
    std::fs::rename(&tmp, path)
}

/// `path.tmp` written by `write` and fsynced; returns its name.
fn write_tmp_synced(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<PathBuf> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    write(&mut f)?;
    // Dying before this fsync: only `path.tmp` may be torn; `path` is the old.
    sync_file(&f, &tmp)?;
    Ok(tmp)
}

/// Renames `from` onto `to` and fsyncs the directory of `to` (and that of
/// `from` when it is another directory), so the new name is durable when
/// this returns. Dying between the rename and the fsync: a power cut may
/// bring the old name back; a kill alone keeps the new one.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    let to_dir = parent_of(to);
    if crate::debug::fail_rename_sync_now(to) {
        return Err(fsync_failed(to_dir, io::Error::from_raw_os_error(5)));
    }
    sync_dir(to_dir)?;
    let from_dir = parent_of(from);
    if from_dir != to_dir {
        sync_dir(from_dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_missing_level_and_reports_it() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        assert!(create_dir_durable(&deep).unwrap());
        assert!(deep.is_dir());
        assert!(!create_dir_durable(&deep).unwrap());
        std::fs::write(d.path().join("f"), b"x").unwrap();
        assert!(create_dir_durable(&d.path().join("f")).is_err());
    }

    #[test]
    fn write_file_durable_replaces_and_leaves_no_tmp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        write_file_durable(&p, b"one").unwrap();
        write_file_durable(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!d.path().join("x.json.tmp").exists());
    }

    #[test]
    fn fsync_failures_are_told_apart() {
        let e = fsync_failed(Path::new("/x"), io::Error::from_raw_os_error(5));
        assert!(is_fsync_failure(&e));
        assert!(!is_fsync_failure(&io::Error::from_raw_os_error(5)));
        assert!(e.to_string().contains("fsync of /x failed"), "{e}");
    }
}
