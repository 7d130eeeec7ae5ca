//! The namespace and durability model behind the mount.
//!
//! The backing directory always holds the current state, what a running
//! Linux shows through its caches. Beside it the model keeps what a power cut
//! would bring back:
//!
//! - per file, a [`DataUndo`] from its first change after its last fsync or
//!   fdatasync (on any descriptor of the inode);
//! - per directory, its durable entry list (name to inode) from its first
//!   change after its last fsync: creations, renames (both sides), links and
//!   removals.
//!
//! An inode that loses its last name while a durable entry list still names it
//! (an unlink, an rmdir, or a rename over it, not yet made durable) is moved
//! into the grave, `BACKING/.powercut-fs/grave/<id>`, instead of being
//! deleted, so that a cut can bring it back. It is deleted for real once no
//! durable entry list names it.
//!
//! A cut ([`Model::cut`]) first reverts the data of every file, then rebuilds
//! the tree from the durable entry lists: it hard-links every durable file into
//! a fresh tree (same inodes, so the reverted data comes along), swaps that
//! tree in and rescans. Inode numbers and file handles handed out before a cut
//! are never reused; requests on them fail with ESTALE or EBADF.
//!
//! Strictly POSIX, stricter than ext4: an fsync of a file does not make its
//! directory entry durable, and a rename across directories needs both
//! directories synced.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Errno, OrErrno, Res};
use crate::undo::DataUndo;

mod cut;
mod data;
mod names;

pub type NodeId = u64;
/// The FUSE inode number of the mount's root.
pub const ROOT: NodeId = 1;
/// The model's own folder inside the backing directory, hidden from the mount.
pub const META: &str = ".powercut-fs";

/// What kind of inode: only files carry data, only directories entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    /// Symlinks, FIFOs, sockets, device nodes: names without modelled data.
    Other,
}

impl Kind {
    pub fn of(md: &Metadata) -> Kind {
        let t = md.file_type();
        if t.is_dir() {
            Kind::Dir
        } else if t.is_file() {
            Kind::File
        } else {
            Kind::Other
        }
    }
}

#[derive(Debug, Default)]
struct Entries {
    current: BTreeMap<OsString, NodeId>,
    /// Some from the first change after the directory's last fsync.
    durable: Option<BTreeMap<OsString, NodeId>>,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    /// `st_mode & S_IFMT`, for directory listings.
    fmt: u32,
    /// Current names (a directory has at most one; the root none).
    links: Vec<(NodeId, OsString)>,
    /// Nameless, but a durable entry list still names it.
    in_grave: bool,
    /// Nameless and named by no durable entry list: gone but for open handles.
    dead: bool,
    /// Lookups the kernel holds (FUSE `forget` gives them back).
    lookups: u64,
    entries: Entries,
    data: Option<DataUndo>,
}

impl Node {
    fn new(md: &Metadata) -> Node {
        Node {
            kind: Kind::of(md),
            fmt: md.mode() & libc::S_IFMT,
            links: Vec::new(),
            in_grave: false,
            dead: false,
            lookups: 0,
            entries: Entries::default(),
            data: None,
        }
    }
}

/// An open file: our own descriptor of the backing file.
#[derive(Debug)]
struct Handle {
    node: NodeId,
    file: File,
    /// O_APPEND: every write goes to the current end, whatever offset the
    /// kernel sends.
    append: bool,
    /// O_SYNC or O_DSYNC: every write is synced.
    sync: bool,
}

/// One entry of a directory listing.
#[derive(Debug)]
pub struct Listed {
    pub node: NodeId,
    /// `st_mode & S_IFMT`.
    pub fmt: u32,
    pub name: OsString,
}

/// What a cut did.
#[derive(Debug, Default)]
pub struct CutReport {
    pub files_reverted: u64,
    pub pages_dropped: u64,
    pub pages_kept: u64,
    pub dirs_reverted: u64,
    pub handles_closed: u64,
}

/// The mount's whole state, behind one lock.
#[derive(Debug)]
pub struct Model {
    backing: PathBuf,
    meta: PathBuf,
    nodes: HashMap<NodeId, Node>,
    next_id: NodeId,
    /// How many durable entry lists name each node.
    refs: HashMap<NodeId, u32>,
    handles: HashMap<u64, Handle>,
    dir_handles: HashMap<u64, Vec<Listed>>,
    next_fh: u64,
    cuts: u64,
    owner: (u32, u32),
}

impl Model {
    /// Takes the current content of `backing` as durable, as after a boot.
    pub fn load(backing: &Path) -> io::Result<Model> {
        let meta = backing.join(META);
        fs::create_dir_all(&meta)?;
        fs::set_permissions(&meta, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for leftover in ["grave", "next", "trash"] {
            let p = meta.join(leftover);
            if p.exists() {
                fs::remove_dir_all(&p)?;
            }
        }
        fs::create_dir(meta.join("grave"))?;
        let mut model = Model {
            backing: backing.to_path_buf(),
            meta,
            nodes: HashMap::new(),
            next_id: ROOT + 1,
            refs: HashMap::new(),
            handles: HashMap::new(),
            dir_handles: HashMap::new(),
            next_fh: 1,
            cuts: 0,
            owner: sys::euid_egid(),
        };
        model.rescan()?;
        Ok(model)
    }

    fn rescan(&mut self) -> io::Result<()> {
        self.nodes.clear();
        self.refs.clear();
        let md = fs::symlink_metadata(&self.backing)?;
        self.nodes.insert(ROOT, Node::new(&md));
        let mut inodes = HashMap::new();
        let backing = self.backing.clone();
        self.scan(ROOT, &backing, &mut inodes)
    }

    fn scan(
        &mut self,
        dir: NodeId,
        path: &Path,
        inodes: &mut HashMap<(u64, u64), NodeId>,
    ) -> io::Result<()> {
        let mut names: Vec<OsString> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            if dir == ROOT && name == META {
                continue;
            }
            let child_path = path.join(&name);
            let md = fs::symlink_metadata(&child_path)?;
            let kind = Kind::of(&md);
            let id = match inodes.get(&(md.dev(), md.ino())) {
                Some(id) if kind != Kind::Dir => *id,
                _ => {
                    let id = self.fresh_id();
                    self.nodes.insert(id, Node::new(&md));
                    inodes.insert((md.dev(), md.ino()), id);
                    id
                }
            };
            self.attach(dir, &name, id);
            if kind == Kind::Dir {
                self.scan(id, &child_path, inodes)?;
            }
        }
        Ok(())
    }

    fn fresh_id(&mut self) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn node(&self, id: NodeId) -> Res<&Node> {
        self.nodes.get(&id).ok_or(libc::ESTALE)
    }

    fn node_mut(&mut self, id: NodeId) -> Res<&mut Node> {
        self.nodes.get_mut(&id).ok_or(libc::ESTALE)
    }

    fn grave_path(&self, id: NodeId) -> PathBuf {
        self.meta.join("grave").join(id.to_string())
    }

    /// Where the inode is in the backing directory now.
    pub fn path_of(&self, id: NodeId) -> Option<PathBuf> {
        if id == ROOT {
            return Some(self.backing.clone());
        }
        let node = self.nodes.get(&id)?;
        match node.links.first() {
            Some((parent, name)) => Some(self.path_of(*parent)?.join(name)),
            None if node.in_grave => Some(self.grave_path(id)),
            None => None,
        }
    }

    fn dir_path(&self, dir: NodeId) -> Res<PathBuf> {
        match self.node(dir)?.kind {
            Kind::Dir => self.path_of(dir).ok_or(libc::ENOENT),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn child(&self, dir: NodeId, name: &OsStr) -> Res<Option<NodeId>> {
        let node = self.node(dir)?;
        if node.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(node.entries.current.get(name).copied())
    }

    /// A name the mount must not create: the model's own folder.
    fn check_name(dir: NodeId, name: &OsStr) -> Res<()> {
        if dir == ROOT && name == META {
            Err(libc::EACCES)
        } else {
            Ok(())
        }
    }

    fn attach(&mut self, dir: NodeId, name: &OsStr, id: NodeId) {
        if let Some(d) = self.nodes.get_mut(&dir) {
            d.entries.current.insert(name.to_os_string(), id);
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.links.push((dir, name.to_os_string()));
        }
    }

    fn detach(&mut self, dir: NodeId, name: &OsStr, id: NodeId) {
        if let Some(d) = self.nodes.get_mut(&dir) {
            d.entries.current.remove(name);
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(i) = n.links.iter().position(|(p, l)| *p == dir && l == name) {
                n.links.remove(i);
            }
        }
    }

    /// From the first change after the directory's last fsync on, keep its
    /// entries as they were. Marking a directory whose change then fails is
    /// harmless: its durable list equals its current one.
    fn touch_dir(&mut self, dir: NodeId) {
        let Some(node) = self.nodes.get_mut(&dir) else {
            return;
        };
        if node.entries.durable.is_some() {
            return;
        }
        let snapshot = node.entries.current.clone();
        for id in snapshot.values() {
            *self.refs.entry(*id).or_insert(0) += 1;
        }
        node.entries.durable = Some(snapshot);
    }

    fn referenced(&self, id: NodeId) -> bool {
        self.refs.get(&id).is_some_and(|r| *r > 0)
    }

    fn unref(&mut self, id: NodeId) {
        if let Some(r) = self.refs.get_mut(&id) {
            *r -= 1;
            if *r == 0 {
                self.refs.remove(&id);
                self.release_if_garbage(id);
            }
        }
    }

    /// Deletes an inode that no current name and no durable entry list names.
    fn release_if_garbage(&mut self, id: NodeId) {
        let grave = self.grave_path(id);
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if !node.links.is_empty() || node.dead || self.refs.contains_key(&id) {
            return;
        }
        if node.in_grave {
            let gone = if node.kind == Kind::Dir {
                fs::remove_dir(&grave)
            } else {
                fs::remove_file(&grave)
            };
            if let Err(e) = gone {
                eprintln!("powercut-fs: cannot delete {}: {e}", grave.display());
            }
            node.in_grave = false;
        }
        node.dead = true;
        node.data = None;
        let durable = node.entries.durable.take();
        for child in durable.into_iter().flat_map(BTreeMap::into_values) {
            self.unref(child);
        }
        self.maybe_forget(id);
    }

    fn maybe_forget(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get(&id) else {
            return;
        };
        if id != ROOT
            && node.dead
            && node.lookups == 0
            && !self.handles.values().any(|h| h.node == id)
        {
            self.nodes.remove(&id);
        }
    }

    /// The inode's last name is gone: to the grave if a durable entry list
    /// still names it, else away. `path` is where it is now.
    fn bury_or_delete(&mut self, id: NodeId, path: &Path) -> Res<()> {
        let kind = self.node(id)?.kind;
        if self.referenced(id) {
            fs::rename(path, self.grave_path(id)).or_errno()?;
            self.node_mut(id)?.in_grave = true;
        } else {
            if kind == Kind::Dir {
                fs::remove_dir(path).or_errno()?;
            } else {
                fs::remove_file(path).or_errno()?;
            }
            self.release_if_garbage(id);
        }
        Ok(())
    }

    // ---- lookups and attributes -------------------------------------------

    pub fn lookup(&mut self, dir: NodeId, name: &OsStr) -> Res<(NodeId, Metadata)> {
        let id = self.child(dir, name)?.ok_or(libc::ENOENT)?;
        let md = self.metadata(id, None)?;
        self.node_mut(id)?.lookups += 1;
        Ok((id, md))
    }

    pub fn forget(&mut self, id: NodeId, n: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.maybe_forget(id);
    }

    pub fn metadata(&self, id: NodeId, fh: Option<u64>) -> Res<Metadata> {
        if let Some(h) = fh.and_then(|fh| self.handles.get(&fh)) {
            return h.file.metadata().or_errno();
        }
        match self.path_of(id) {
            Some(p) => fs::symlink_metadata(p).or_errno(),
            None => {
                self.node(id)?;
                let h = self
                    .handles
                    .values()
                    .find(|h| h.node == id)
                    .ok_or(libc::ENOENT)?;
                h.file.metadata().or_errno()
            }
        }
    }

    /// Current names of the inode (0 once unlinked, even while in the grave).
    pub fn nlink(&self, id: NodeId) -> Option<u32> {
        let node = self.nodes.get(&id)?;
        (node.kind != Kind::Dir).then_some(node.links.len() as u32)
    }

    /// A path to reach the inode's attributes: its name, or an open handle.
    fn any_path(&self, id: NodeId) -> Res<PathBuf> {
        if let Some(p) = self.path_of(id) {
            return Ok(p);
        }
        use std::os::unix::io::AsRawFd;
        let h = self
            .handles
            .values()
            .find(|h| h.node == id)
            .ok_or(libc::ENOENT)?;
        Ok(PathBuf::from(format!(
            "/proc/self/fd/{}",
            h.file.as_raw_fd()
        )))
    }

    pub fn chmod(&self, id: NodeId, mode: u32) -> Res<()> {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(
            self.any_path(id)?,
            fs::Permissions::from_mode(mode & 0o7777),
        )
        .or_errno()
    }

    pub fn chown(&self, id: NodeId, uid: Option<u32>, gid: Option<u32>) -> Res<()> {
        std::os::unix::fs::lchown(self.any_path(id)?, uid, gid).or_errno()
    }

    pub fn utimens(&self, id: NodeId, atime: &sys::Stamp, mtime: &sys::Stamp) -> Res<()> {
        sys::utimens(&self.any_path(id)?, atime, mtime)
    }

    pub fn readlink(&self, id: NodeId) -> Res<PathBuf> {
        fs::read_link(self.path_of(id).ok_or(libc::ENOENT)?).or_errno()
    }

    pub fn statfs(&self) -> Res<libc::statvfs> {
        sys::statvfs(&self.backing)
    }
}

fn missing(id: NodeId) -> io::Error {
    io::Error::other(format!(
        "model bug: durable inode {id} has no place in the backing directory"
    ))
}

/// The errno a failed model call reports as an `io::Error`.
pub fn to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e)
}
