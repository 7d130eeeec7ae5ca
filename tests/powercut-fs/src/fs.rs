//! The FUSE side: every request goes to the [`Model`] under one lock.
//!
//! - Every file is opened with `FOPEN_DIRECT_IO`, so the kernel keeps no page
//!   cache of its own: each read and write reaches the model (O_DIRECT opens
//!   work too), and nothing cached survives a cut. Shared writable `mmap` is
//!   therefore not supported; neither sled 0.34 nor sluice maps files.
//! - Entries and attributes are given with a TTL of 0, so that the kernel asks
//!   again after a cut instead of trusting an inode that went away.
//! - Locks (`flock`, `fcntl`) are not passed through: the session does not
//!   offer `FUSE_POSIX_LOCKS` or `FUSE_FLOCK_LOCKS`, so the kernel keeps them
//!   on the mount's inodes, between the processes using the mount, and drops
//!   them when the holder dies, as on a local filesystem.
//! - `sync_file_range` never reaches a FUSE filesystem, and `syncfs` does not
//!   either: both make nothing durable here (see README.md).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::model::{Model, NodeId};
use crate::sys::{self, Stamp};

const TTL: Duration = Duration::ZERO;

/// The filesystem handed to fuser.
pub struct PowercutFs {
    model: Arc<Mutex<Model>>,
}

impl PowercutFs {
    pub fn new(model: Arc<Mutex<Model>>) -> Self {
        PowercutFs { model }
    }

    fn lock(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }
}

/// The model, even after a panic elsewhere held the lock (the panic is the
/// bug to report; the mount should keep answering).
pub fn lock(model: &Mutex<Model>) -> MutexGuard<'_, Model> {
    model.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(e: sys::Errno) -> Errno {
    Errno::from_i32(e)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nsecs.clamp(0, 999_999_999) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

fn file_type(md: &Metadata) -> FileType {
    let t = md.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else if t.is_fifo() {
        FileType::NamedPipe
    } else if t.is_socket() {
        FileType::Socket
    } else if t.is_char_device() {
        FileType::CharDevice
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else {
        FileType::RegularFile
    }
}

fn attr(model: &Model, id: NodeId, md: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: file_type(md),
        perm: (md.mode() & 0o7777) as u16,
        nlink: model.nlink(id).unwrap_or(md.nlink() as u32),
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

fn stamp(t: Option<TimeOrNow>) -> Stamp {
    match t {
        None => Stamp::Omit,
        Some(TimeOrNow::Now) => Stamp::Now,
        Some(TimeOrNow::SpecificTime(t)) => Stamp::At(t),
    }
}

fn entry(model: &Model, reply: ReplyEntry, result: Result<(NodeId, Metadata), sys::Errno>) {
    match result {
        Ok((id, md)) => reply.entry(&TTL, &attr(model, id, &md), Generation(0)),
        Err(e) => reply.error(err(e)),
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), sys::Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

fn owner(req: &Request) -> (u32, u32) {
    (req.uid(), req.gid())
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut m = self.lock();
        let r = m.lookup(parent.0, name);
        entry(&m, reply, r);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.lock().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let m = self.lock();
        match m.metadata(ino.0, fh.map(|f| f.0)) {
            Ok(md) => reply.attr(&TTL, &attr(&m, ino.0, &md)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut m = self.lock();
        let id = ino.0;
        let fh = fh.map(|f| f.0);
        let result = (|| {
            if let Some(size) = size {
                m.truncate(id, fh, size)?;
            }
            if let Some(mode) = mode {
                m.chmod(id, mode)?;
            }
            if uid.is_some() || gid.is_some() {
                m.chown(id, uid, gid)?;
            }
            if atime.is_some() || mtime.is_some() {
                m.utimens(id, &stamp(atime), &stamp(mtime))?;
            }
            m.metadata(id, fh)
        })();
        match result {
            Ok(md) => reply.attr(&TTL, &attr(&m, id, &md)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        use std::os::unix::ffi::OsStrExt;
        match self.lock().readlink(ino.0) {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut m = self.lock();
        let r = m.make(parent.0, name, owner(req), |p| {
            sys::mknod(p, mode & !umask, rdev)
        });
        entry(&m, reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut m = self.lock();
        let r = m.mkdir(parent.0, name, mode & !umask, owner(req));
        entry(&m, reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.lock().unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.lock().rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut m = self.lock();
        let r = m.make(parent.0, link_name, owner(req), |p| {
            std::os::unix::fs::symlink(target, p).map_err(|e| sys::errno(&e))
        });
        entry(&m, reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.lock()
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut m = self.lock();
        let r = m.link(ino.0, newparent.0, newname);
        entry(&m, reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.lock().read(fh.0, offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.lock().write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.lock().fsync(ino.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let m = self.lock();
        let list = match m.readdir(fh.0) {
            Ok(list) => list,
            Err(e) => return reply.error(err(e)),
        };
        for (i, e) in list.iter().enumerate().skip(offset as usize) {
            let kind = match e.fmt {
                libc::S_IFDIR => FileType::Directory,
                libc::S_IFLNK => FileType::Symlink,
                libc::S_IFIFO => FileType::NamedPipe,
                libc::S_IFSOCK => FileType::Socket,
                libc::S_IFCHR => FileType::CharDevice,
                libc::S_IFBLK => FileType::BlockDevice,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(e.node), i as u64 + 1, kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.lock().fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.lock().statfs() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The mount uses default_permissions: the kernel checks the mode bits.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut m = self.lock();
        match m.create(parent.0, name, mode & !umask, flags, owner(req)) {
            Ok((id, md, fh)) => reply.created(
                &TTL,
                &attr(&m, id, &md),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.lock().fallocate(fh.0, offset, length, mode));
    }
}
