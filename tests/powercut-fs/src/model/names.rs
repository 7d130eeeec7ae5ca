//! Names: creating, removing, renaming and linking entries, and the durable
//! entry lists those changes start.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, Metadata, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::{Kind, Listed, Model, Node, NodeId, ROOT};
use crate::sys::{self, OrErrno, Res};
use crate::undo::DataUndo;

impl Model {
    // ---- names --------------------------------------------------------------

    /// Creates a new inode named `name` in `dir` with `make(path)`, owned by
    /// the caller. A new directory starts with a durable (empty) entry list,
    /// a new file with a durable size of 0.
    pub fn make(
        &mut self,
        dir: NodeId,
        name: &OsStr,
        owner: (u32, u32),
        make: impl FnOnce(&Path) -> Res<()>,
    ) -> Res<(NodeId, Metadata)> {
        Self::check_name(dir, name)?;
        if self.child(dir, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        let path = self.dir_path(dir)?.join(name);
        self.touch_dir(dir);
        make(&path)?;
        if owner != self.owner {
            std::os::unix::fs::lchown(&path, Some(owner.0), Some(owner.1)).or_errno()?;
        }
        let md = fs::symlink_metadata(&path).or_errno()?;
        let kind = Kind::of(&md);
        let id = self.fresh_id();
        let mut node = Node::new(&md);
        node.lookups = 1;
        match kind {
            Kind::Dir => node.entries.durable = Some(BTreeMap::new()),
            Kind::File => node.data = Some(DataUndo::new(0)),
            Kind::Other => {}
        }
        self.nodes.insert(id, node);
        self.attach(dir, name, id);
        Ok((id, md))
    }

    pub fn mkdir(
        &mut self,
        dir: NodeId,
        name: &OsStr,
        mode: u32,
        owner: (u32, u32),
    ) -> Res<(NodeId, Metadata)> {
        self.make(dir, name, owner, |p| {
            fs::DirBuilder::new()
                .mode(mode & 0o7777)
                .create(p)
                .or_errno()
        })
    }

    /// Creates and opens a regular file (FUSE `create`).
    pub fn create(
        &mut self,
        dir: NodeId,
        name: &OsStr,
        mode: u32,
        flags: i32,
        owner: (u32, u32),
    ) -> Res<(NodeId, Metadata, u64)> {
        if let Some(existing) = self.child(dir, name)? {
            if flags & libc::O_EXCL != 0 {
                return Err(libc::EEXIST);
            }
            let fh = self.open(existing, flags)?;
            let md = self.metadata(existing, Some(fh))?;
            self.node_mut(existing)?.lookups += 1;
            return Ok((existing, md, fh));
        }
        let mut created = None;
        let (id, md) = self.make(dir, name, owner, |p| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode & 0o7777)
                .open(p)
                .or_errno()?;
            created = Some(f);
            Ok(())
        })?;
        let file = created.ok_or(libc::EIO)?;
        Ok((id, md, self.add_handle(id, file, flags)))
    }

    pub fn unlink(&mut self, dir: NodeId, name: &OsStr) -> Res<()> {
        let id = self.child(dir, name)?.ok_or(libc::ENOENT)?;
        if self.node(id)?.kind == Kind::Dir {
            return Err(libc::EISDIR);
        }
        let path = self.dir_path(dir)?.join(name);
        self.touch_dir(dir);
        if self.node(id)?.links.len() > 1 {
            fs::remove_file(&path).or_errno()?;
            self.detach(dir, name, id);
            return Ok(());
        }
        self.detach(dir, name, id);
        if let Err(e) = self.bury_or_delete(id, &path) {
            self.attach(dir, name, id);
            return Err(e);
        }
        Ok(())
    }

    pub fn rmdir(&mut self, dir: NodeId, name: &OsStr) -> Res<()> {
        let id = self.child(dir, name)?.ok_or(libc::ENOENT)?;
        let node = self.node(id)?;
        if node.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        if !node.entries.current.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        let path = self.dir_path(dir)?.join(name);
        self.touch_dir(dir);
        // Detach first so that a dir that goes away for good counts as garbage.
        self.detach(dir, name, id);
        if let Err(e) = self.bury_or_delete(id, &path) {
            self.attach(dir, name, id);
            return Err(e);
        }
        Ok(())
    }

    /// Is `ancestor` on the path from the root to `dir` (or `dir` itself)?
    fn is_within(&self, dir: NodeId, ancestor: NodeId) -> bool {
        let mut cur = dir;
        loop {
            if cur == ancestor {
                return true;
            }
            match self.nodes.get(&cur).and_then(|n| n.links.first()) {
                Some((parent, _)) => cur = *parent,
                None => return false,
            }
        }
    }

    pub fn rename(
        &mut self,
        from_dir: NodeId,
        from: &OsStr,
        to_dir: NodeId,
        to: &OsStr,
        flags: u32,
    ) -> Res<()> {
        Self::check_name(to_dir, to)?;
        let id = self.child(from_dir, from)?.ok_or(libc::ENOENT)?;
        let target = self.child(to_dir, to)?;
        if flags & libc::RENAME_WHITEOUT != 0 {
            return Err(libc::EINVAL);
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        match target {
            Some(_) if flags & libc::RENAME_NOREPLACE != 0 => return Err(libc::EEXIST),
            None if exchange => return Err(libc::ENOENT),
            Some(t) if t == id => return Ok(()),
            _ => {}
        }
        let kind = self.node(id)?.kind;
        if kind == Kind::Dir && self.is_within(to_dir, id) {
            return Err(libc::EINVAL);
        }
        let from_path = self.dir_path(from_dir)?.join(from);
        let to_path = self.dir_path(to_dir)?.join(to);
        self.touch_dir(from_dir);
        self.touch_dir(to_dir);
        if exchange {
            let t = target.ok_or(libc::ENOENT)?;
            if self.node(t)?.kind == Kind::Dir && self.is_within(from_dir, t) {
                return Err(libc::EINVAL);
            }
            sys::rename(&from_path, &to_path, libc::RENAME_EXCHANGE)?;
            self.detach(from_dir, from, id);
            self.detach(to_dir, to, t);
            self.attach(to_dir, to, id);
            self.attach(from_dir, from, t);
            return Ok(());
        }
        // The replaced inode: keep it in the grave first if it loses its last
        // name and a durable entry list names it, then rename over it.
        let mut buried = None;
        if let Some(t) = target {
            let tnode = self.node(t)?;
            match (kind == Kind::Dir, tnode.kind == Kind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !tnode.entries.current.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            if tnode.links.len() == 1 && self.referenced(t) {
                let grave = self.grave_path(t);
                if tnode.kind == Kind::Dir {
                    fs::rename(&to_path, &grave).or_errno()?;
                } else {
                    fs::hard_link(&to_path, &grave).or_errno()?;
                }
                buried = Some((t, grave));
            }
        }
        if let Err(e) = sys::rename(&from_path, &to_path, flags) {
            if let Some((t, grave)) = buried {
                let undo = if self.node(t)?.kind == Kind::Dir {
                    fs::rename(&grave, &to_path)
                } else {
                    fs::remove_file(&grave)
                };
                if let Err(u) = undo {
                    eprintln!(
                        "powercut-fs: cannot undo burying {}: {u}",
                        to_path.display()
                    );
                }
            }
            return Err(e);
        }
        if let Some(t) = target {
            self.detach(to_dir, to, t);
            if buried.is_some() {
                self.node_mut(t)?.in_grave = true;
            } else {
                self.release_if_garbage(t);
            }
        }
        self.detach(from_dir, from, id);
        self.attach(to_dir, to, id);
        Ok(())
    }

    pub fn link(&mut self, id: NodeId, dir: NodeId, name: &OsStr) -> Res<(NodeId, Metadata)> {
        Self::check_name(dir, name)?;
        if self.node(id)?.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        if self.child(dir, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        let src = self.path_of(id).ok_or(libc::ENOENT)?;
        let dst = self.dir_path(dir)?.join(name);
        self.touch_dir(dir);
        fs::hard_link(&src, &dst).or_errno()?;
        if self.node(id)?.in_grave {
            fs::remove_file(&src).or_errno()?;
            self.node_mut(id)?.in_grave = false;
        }
        self.attach(dir, name, id);
        self.node_mut(id)?.lookups += 1;
        Ok((id, fs::symlink_metadata(&dst).or_errno()?))
    }

    pub fn fsyncdir(&mut self, dir: NodeId) -> Res<()> {
        let durable = self.node_mut(dir)?.entries.durable.take();
        for child in durable.into_iter().flat_map(BTreeMap::into_values) {
            self.unref(child);
        }
        Ok(())
    }

    // ---- directory listings -------------------------------------------------

    pub fn opendir(&mut self, dir: NodeId) -> Res<u64> {
        let node = self.node(dir)?;
        if node.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let parent = node.links.first().map_or(ROOT, |(p, _)| *p);
        let mut list = vec![
            Listed {
                node: dir,
                fmt: libc::S_IFDIR,
                name: ".".into(),
            },
            Listed {
                node: parent,
                fmt: libc::S_IFDIR,
                name: "..".into(),
            },
        ];
        for (name, id) in &node.entries.current {
            let fmt = self.node(*id)?.fmt;
            list.push(Listed {
                node: *id,
                fmt,
                name: name.clone(),
            });
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.dir_handles.insert(fh, list);
        Ok(fh)
    }

    /// The listing taken at `opendir`, from `offset` on.
    pub fn readdir(&self, fh: u64) -> Res<&[Listed]> {
        self.dir_handles
            .get(&fh)
            .map(Vec::as_slice)
            .ok_or(libc::EBADF)
    }

    pub fn releasedir(&mut self, fh: u64) {
        self.dir_handles.remove(&fh);
    }
}
