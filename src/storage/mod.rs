//! The storage layer: the one place that writes, syncs, renames and creates
//! what sluice persists, and knows which fsyncs make it survive a power
//! cut. A leaf: it depends on nothing but `debug` (fault hooks).
//!
//! - [`io`]: file I/O behind the [`io::Filesystem`] trait, with [`io::StdFs`]
//!   (real files) and [`io::SimFs`] (a disk model that drops what was not
//!   synced, and injects ENOSPC and EIO). The WAL does all its I/O through it.
//! - [`durable`]: durable directories and whole-file replacement on the
//!   real filesystem, and the wrapper that marks a failed fsync
//!   ([`durable::is_fsync_failure`]: sticky, the owner must stop).
//!
//! The names every other module uses are re-exported here:
//! [`replace_durably`] (tmp, fsync, rename, directory fsync),
//! [`create_dir_all_durable`], [`sync_dir_chain`], [`append`] (write and
//! fdatasync at the end of an open file), [`rename_durable`], [`sync_file`],
//! [`sync_file_data`] and [`sync_dir`].
//!
//! Enforced: `clippy.toml` disallows `File::sync_all`, `File::sync_data`,
//! `fs::rename` and `fs::create_dir_all` everywhere else in the crate, so a
//! new durable file cannot skip this layer by accident.
#![allow(clippy::disallowed_methods)] // the one place they are allowed

pub mod durable;
pub mod io;

use std::fs::File;
use std::io::Write;
use std::path::Path;

pub use durable::{
    is_fsync_failure, rename_durable, replace_file, sync_dir, sync_file, sync_file_data,
    write_file_durable as replace_durably, write_file_durable_with as replace_durably_with,
};
pub use io::create_dir_all_durable;

/// fsyncs `dir` and each of its ancestors up to and including `root` (a
/// directory an earlier process created and died before fsyncing in its
/// parent). `dir` must be inside `root`; ancestors outside it are the
/// operator's and are left alone.
pub fn sync_dir_chain(dir: &Path, root: &Path) -> std::io::Result<()> {
    let mut d = Some(dir);
    while let Some(up) = d.filter(|u| u.starts_with(root)) {
        sync_dir(up)?;
        d = up.parent();
    }
    Ok(())
}

/// Writes `bytes` at the end of `file` (opened with `O_APPEND`) and
/// fdatasyncs it: durable when this returns. A failure may leave a prefix
/// written (the caller decides what a torn tail means for its format); a
/// failed fdatasync is marked ([`is_fsync_failure`]).
pub fn append(file: &mut File, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)?;
    sync_file_data(file, path)
}

/// A plain `rename` without the directory fsync, for files whose name
/// need not survive a power cut (a summary the next open writes again),
/// or whose directory the caller fsyncs once for many renames.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)
}

/// Creates `dir` and its missing parents without fsyncing them: only for
/// directories whose entries need not survive a power cut (scratch and
/// quarantine copies that are themselves best effort).
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}
