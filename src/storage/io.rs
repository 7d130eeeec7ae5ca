//! File I/O behind a small trait, so that tests can model exactly which bytes
//! are durable. [`StdFs`] is the real thing. [`SimFs`] is a disk model: written
//! bytes become durable only on `sync_data`, directory entries only on
//! `sync_dir`, and [`SimFs::crash`] drops (or tears) whatever was not synced. It
//! can also inject ENOSPC and EIO on writes and syncs, and models what Linux
//! does after a failed fdatasync: the bytes stay readable through the page
//! cache, are never written by a later sync, and vanish at the next crash.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// An open file. Writes are positional so a handle holds no cursor state.
#[allow(clippy::len_without_is_empty)] // a file length, not a collection
pub trait WalFile: Send + Sync {
    fn len(&self) -> io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes the whole buffer at `offset`, or fails. A failure may leave a
    /// prefix of `buf` written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
}

/// The filesystem operations the WAL needs, and nothing more.
pub trait Filesystem: Send + Sync + 'static {
    /// Creates `dir` and its missing parents, and makes each new entry durable
    /// (an fsync of the parent of every directory it created).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the regular files directly inside `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing file read-only so that reads return what the storage
    /// device holds, not the page cache (`O_DIRECT`). After a failed fsync the
    /// kernel keeps the unwritten pages readable and marks them clean; only a
    /// read that bypasses the cache tells that those bytes never reached the
    /// disk. The default is an ordinary open, for test filesystems that have
    /// no cache to bypass.
    fn open_direct(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        self.open(path)
    }
    /// Creates (or truncates) a file for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals inside `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes available to an unprivileged writer on the filesystem of `dir`.
    fn free_bytes(&self, dir: &Path) -> io::Result<u64>;
}

/// Real files.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

struct StdFile(std::fs::File);

impl WalFile for StdFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if crate::debug::fail_read_now() {
            return Err(io::Error::from_raw_os_error(5));
        }
        FileExt::read_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        if crate::debug::fail_fsync_now() {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.0.sync_data()
    }
}

/// [`Filesystem::create_dir_all`] on real directories:
/// [`crate::storage::durable::create_dir_durable`] (each missing level created
/// top-down, it and its parent fsynced), so a directory we created (and the
/// files we later make durable inside it) survives a power loss.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    crate::storage::durable::create_dir_durable(dir).map(|_| ())
}

/// Alignment of `O_DIRECT` transfers: the largest logical block size in use
/// (4 KiB native disks); 512-byte devices accept it too.
const DIRECT_ALIGN: usize = 4096;

/// A read-only `O_DIRECT` handle. Reads go through an aligned bounce buffer,
/// since `O_DIRECT` needs the offset, length and memory address aligned.
struct DirectFile(std::fs::File);

impl WalFile for DirectFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let start = offset - offset % DIRECT_ALIGN as u64;
        let skip = (offset - start) as usize;
        let want = (skip + buf.len()).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut raw = vec![0u8; want + DIRECT_ALIGN];
        let pad = raw.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut raw[pad..pad + want];
        let n = rustix::io::pread(&self.0, &mut *aligned, start)?;
        if n <= skip {
            return Ok(0);
        }
        let n = (n - skip).min(buf.len());
        buf[..n].copy_from_slice(&aligned[skip..skip + n]);
        Ok(n)
    }
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a direct-read handle is read-only",
        ))
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a direct-read handle is read-only",
        ))
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
}

impl Filesystem for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_dir_all_durable(dir)
    }
    fn open_direct(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path);
        match direct {
            Ok(f) => Ok(Box::new(DirectFile(f))),
            // EINVAL: the filesystem has no O_DIRECT (tmpfs before Linux 6.6,
            // some FUSE). Such filesystems keep no separate disk copy behind
            // the cache, or we cannot reach it; read through the cache.
            Err(e) if e.raw_os_error() == Some(22) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(file = %path.display(), "O_DIRECT is not supported here: verifying the WAL tail through the page cache");
                });
                self.open(path)
            }
            Err(e) => Err(e),
        }
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(StdFile(f)))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(StdFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        let st = rustix::fs::statvfs(dir)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// A fault the simulated disk injects once, on the next matching call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next write stores `written` bytes of its buffer, then fails.
    Write { written: usize, kind: FaultKind },
    /// The next `sync_data` or `sync_dir` fails and makes nothing durable.
    Sync(FaultKind),
    /// The next `sync_dir` fails and makes nothing durable (`sync_data` calls
    /// before it succeed).
    SyncDir(FaultKind),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Write,
    SyncData,
    SyncDir,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// ENOSPC
    NoSpace,
    /// EIO
    Io,
}

impl FaultKind {
    fn error(self) -> io::Error {
        match self {
            FaultKind::NoSpace => io::Error::from_raw_os_error(28),
            FaultKind::Io => io::Error::from_raw_os_error(5),
        }
    }
}

#[derive(Default)]
struct Inode {
    /// What a reader sees now (the page cache).
    data: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// Byte ranges a failed sync marked clean without writing them (Linux
    /// after an fdatasync EIO): readable in `data`, never written by a later
    /// sync unless written again, gone after a crash.
    dropped: Vec<(usize, usize)>,
}

impl Inode {
    /// A successful fdatasync: everything dirty becomes durable, including the
    /// size; dropped ranges keep what the disk had there (zeros past its old
    /// end, as an unwritten block reads).
    fn sync(&mut self) {
        let mut disk = self.data.clone();
        for &(a, b) in &self.dropped {
            for (i, byte) in disk.iter_mut().enumerate().take(b).skip(a) {
                *byte = self.durable.get(i).copied().unwrap_or(0);
            }
        }
        self.durable = disk;
    }

    /// A failed fdatasync: every byte that differs from the disk is marked
    /// clean without being written.
    fn drop_dirty(&mut self) {
        let mut start = None;
        for i in 0..self.data.len() {
            let differs = self.durable.get(i) != Some(&self.data[i]);
            match (differs, start) {
                (true, None) => start = Some(i),
                (false, Some(a)) => {
                    self.dropped.push((a, i));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(a) = start {
            self.dropped.push((a, self.data.len()));
        }
    }

    /// Bytes written again are dirty again.
    fn redirty(&mut self, from: usize, to: usize) {
        let mut out = Vec::new();
        for &(a, b) in &self.dropped {
            if b <= from || a >= to {
                out.push((a, b));
                continue;
            }
            if a < from {
                out.push((a, from));
            }
            if b > to {
                out.push((to, b));
            }
        }
        self.dropped = out;
    }

    fn clip(&mut self, len: usize) {
        self.dropped.retain(|&(a, _)| a < len);
        for r in &mut self.dropped {
            r.1 = r.1.min(len);
        }
    }
}

type InodeRef = Arc<Mutex<Inode>>;

#[derive(Default)]
struct SimState {
    /// The namespace a running process sees.
    names: HashMap<PathBuf, InodeRef>,
    /// The namespace that survives a crash.
    durable_names: HashMap<PathBuf, InodeRef>,
    faults: VecDeque<Fault>,
    /// Total bytes the disk holds; writes past it fail with ENOSPC.
    capacity: u64,
}

/// The simulated disk. Cloning shares the disk. Directories are implicit and
/// always durable; only file contents and names are modelled.
#[derive(Clone)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a SimFs lock is a test failure already; keep going
    // so the panic that matters is the one reported.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimFs {
    pub fn new() -> Self {
        SimFs {
            state: Arc::new(Mutex::new(SimState {
                capacity: u64::MAX,
                ..SimState::default()
            })),
        }
    }

    /// Queues a one-shot fault.
    pub fn inject(&self, fault: Fault) {
        lock(&self.state).faults.push_back(fault);
    }

    /// Drops queued faults that no call has consumed (a restart: an injected
    /// fault belongs to the operation that injected it).
    pub fn clear_faults(&self) {
        lock(&self.state).faults.clear();
    }

    /// Sets the disk size; `free_bytes` reports what is left of it.
    pub fn set_capacity(&self, bytes: u64) {
        lock(&self.state).capacity = bytes;
    }

    /// Bytes used by the files in the live namespace.
    pub fn used_bytes(&self) -> u64 {
        used(&lock(&self.state))
    }

    /// Simulates power loss. Unsynced names vanish. Each file keeps its durable
    /// bytes plus the first `tear(file, unsynced_len)` bytes of whatever was
    /// appended after them, which models a write torn at any byte. Handles from
    /// before the crash are disconnected from the new state.
    pub fn crash(&self, mut tear: impl FnMut(&Path, usize) -> usize) {
        let mut st = lock(&self.state);
        let mut names = HashMap::new();
        let mut durable_names = HashMap::new();
        let mut paths: Vec<_> = st.durable_names.keys().cloned().collect();
        paths.sort();
        for path in paths {
            let old = lock(&st.durable_names[&path]);
            let mut data = old.durable.clone();
            // Unsynced appended bytes may have reached the disk in part; bytes
            // a failed sync dropped never do.
            let dropped_from = old
                .dropped
                .iter()
                .map(|&(a, _)| a)
                .filter(|&a| a >= data.len())
                .min()
                .unwrap_or(old.data.len());
            if old.data.len() > data.len() && old.data.starts_with(&data) {
                let extra = &old.data[data.len()..dropped_from.max(data.len())];
                let keep = tear(&path, extra.len()).min(extra.len());
                data.extend_from_slice(&extra[..keep]);
            }
            drop(old);
            let inode = Arc::new(Mutex::new(Inode {
                durable: data.clone(),
                data,
                dropped: Vec::new(),
            }));
            names.insert(path.clone(), inode.clone());
            durable_names.insert(path, inode);
        }
        st.names = names;
        st.durable_names = durable_names;
        st.faults.clear();
    }

    /// Raw bytes of a file in the live namespace, for tests that damage files.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let st = lock(&self.state);
        st.names.get(path).map(|i| lock(i).data.clone())
    }

    /// Replaces a file's bytes, durably, for tests that damage files.
    pub fn write_file(&self, path: &Path, bytes: &[u8]) {
        let mut st = lock(&self.state);
        let inode = Arc::new(Mutex::new(Inode {
            data: bytes.to_vec(),
            durable: bytes.to_vec(),
            dropped: Vec::new(),
        }));
        st.names.insert(path.to_path_buf(), inode.clone());
        st.durable_names.insert(path.to_path_buf(), inode);
    }

    /// The queued fault, if the front one applies to this call. A
    /// `SyncDir` fault lets `sync_data` calls pass until a `sync_dir` comes.
    fn take_fault(&self, call: Call) -> Option<FaultKind> {
        let mut st = lock(&self.state);
        let hit = match (st.faults.front()?, call) {
            (Fault::Write { kind, .. }, Call::Write) => Some(*kind),
            (Fault::Sync(kind), Call::SyncData | Call::SyncDir) => Some(*kind),
            (Fault::SyncDir(kind), Call::SyncDir) => Some(*kind),
            _ => None,
        };
        if hit.is_some() {
            st.faults.pop_front();
        }
        hit
    }

    fn take_write_fault(&self) -> Option<Fault> {
        let st = lock(&self.state);
        let f = match st.faults.front() {
            Some(f @ Fault::Write { .. }) => Some(*f),
            _ => None,
        };
        drop(st);
        f.and_then(|f| self.take_fault(Call::Write).map(|_| f))
    }
}

fn used(st: &SimState) -> u64 {
    st.names.values().map(|i| lock(i).data.len() as u64).sum()
}

struct SimFile {
    fs: SimFs,
    inode: InodeRef,
}

/// What an `O_DIRECT` read of a [`SimFs`] file returns: the durable bytes,
/// and zeros up to the cached size (unwritten blocks read as zeros).
struct SimDirect(InodeRef);

impl WalFile for SimDirect {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.0).data.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let inode = lock(&self.0);
        let len = inode.data.len();
        let start = (offset as usize).min(len);
        let n = buf.len().min(len - start);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = inode.durable.get(start + i).copied().unwrap_or(0);
        }
        Ok(n)
    }
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
}

impl WalFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.inode).data.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let inode = lock(&self.inode);
        let start = (offset as usize).min(inode.data.len());
        let n = buf.len().min(inode.data.len() - start);
        buf[..n].copy_from_slice(&inode.data[start..start + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let fault = self.fs.take_write_fault();
        let (room, grows) = {
            let st = lock(&self.fs.state);
            let cur = lock(&self.inode).data.len() as u64;
            let end = offset + buf.len() as u64;
            let growth = end.saturating_sub(cur);
            (st.capacity.saturating_sub(used(&st)), growth)
        };
        let (n, err) = match fault {
            Some(Fault::Write { written, kind }) => (written.min(buf.len()), Some(kind.error())),
            _ if grows > room => {
                let n = (buf.len() as u64 - (grows - room)) as usize;
                (n, Some(FaultKind::NoSpace.error()))
            }
            _ => (buf.len(), None),
        };
        let mut inode = lock(&self.inode);
        let off = offset as usize;
        if inode.data.len() < off + n {
            inode.data.resize(off + n, 0);
        }
        inode.data[off..off + n].copy_from_slice(&buf[..n]);
        inode.redirty(off, off + n);
        err.map_or(Ok(()), Err)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut inode = lock(&self.inode);
        inode.data.resize(len as usize, 0);
        inode.clip(len as usize);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        if let Some(kind) = self.fs.take_fault(Call::SyncData) {
            lock(&self.inode).drop_dirty();
            return Err(kind.error());
        }
        lock(&self.inode).sync();
        Ok(())
    }
}

impl Filesystem for SimFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = lock(&self.state);
        Ok(st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let st = lock(&self.state);
        let inode = st.names.get(path).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
        })?;
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
        }))
    }
    fn open_direct(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let st = lock(&self.state);
        let inode = st.names.get(path).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
        })?;
        Ok(Box::new(SimDirect(inode)))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn WalFile>> {
        let inode: InodeRef = Arc::default();
        lock(&self.state)
            .names
            .insert(path.to_path_buf(), inode.clone());
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        let inode = st
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        st.names.insert(to.to_path_buf(), inode);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.state)
            .names
            .remove(path)
            .map(drop)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if let Some(kind) = self.take_fault(Call::SyncDir) {
            return Err(kind.error());
        }
        let mut st = lock(&self.state);
        st.durable_names.retain(|p, _| p.parent() != Some(dir));
        let live: Vec<_> = st
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, i)| (p.clone(), i.clone()))
            .collect();
        st.durable_names.extend(live);
        Ok(())
    }
    fn free_bytes(&self, _dir: &Path) -> io::Result<u64> {
        let st = lock(&self.state);
        Ok(st.capacity.saturating_sub(used(&st)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_bytes_and_names_vanish_on_crash() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        let f = fs.create(&dir.join("a")).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.crash(|_, _| 0);
        assert!(
            fs.list(dir).unwrap().is_empty(),
            "name was never dir-synced"
        );

        let f = fs.create(&dir.join("a")).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        f.write_all_at(b" world", 5).unwrap();
        fs.crash(|_, extra| extra / 2);
        assert_eq!(fs.read_file(&dir.join("a")).unwrap(), b"hello wo");
    }

    #[test]
    fn faults_fire_once_and_capacity_gives_enospc() {
        let fs = SimFs::new();
        let f = fs.create(Path::new("/d/a")).unwrap();
        fs.inject(Fault::Sync(FaultKind::Io));
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(5));
        f.sync_data().unwrap();
        fs.set_capacity(4);
        let err = f.write_all_at(b"abcdef", 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28));
        assert_eq!(fs.read_file(Path::new("/d/a")).unwrap(), b"abcd");
    }

    #[test]
    fn bytes_a_failed_sync_dropped_stay_readable_until_a_crash_and_are_never_written() {
        let fs = SimFs::new();
        let (dir, path) = (Path::new("/d"), Path::new("/d/a"));
        let f = fs.create(path).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        f.write_all_at(b" world", 5).unwrap();
        fs.inject(Fault::Sync(FaultKind::Io));
        assert!(f.sync_data().is_err());
        assert_eq!(fs.read_file(path).unwrap(), b"hello world", "still cached");
        let mut direct = [0xFFu8; 11];
        let n = fs
            .open_direct(path)
            .unwrap()
            .read_at(&mut direct, 0)
            .unwrap();
        assert_eq!(&direct[..n], b"hello\0\0\0\0\0\0", "not on the disk");
        // A later sync "succeeds" without writing them; new bytes land after
        // a hole.
        f.sync_data().unwrap();
        f.write_all_at(b"!", 11).unwrap();
        f.sync_data().unwrap();
        fs.crash(|_, extra| extra);
        assert_eq!(fs.read_file(path).unwrap(), b"hello\0\0\0\0\0\0!");
    }

    #[test]
    fn a_sync_dir_fault_lets_file_syncs_pass() {
        let fs = SimFs::new();
        let f = fs.create(Path::new("/d/a")).unwrap();
        fs.inject(Fault::SyncDir(FaultKind::Io));
        f.sync_data().unwrap();
        assert!(fs.sync_dir(Path::new("/d")).is_err());
        fs.crash(|_, _| 0);
        assert!(fs.list(Path::new("/d")).unwrap().is_empty());
    }
}
