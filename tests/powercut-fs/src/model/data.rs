//! Data: open files, reads, writes and size changes, each saving what it
//! overwrites into the file's [`DataUndo`] first.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;

use super::{Handle, Kind, Model, Node, NodeId};
use crate::sys::{self, OrErrno, Res};
use crate::undo::DataUndo;

impl Model {
    // ---- data ---------------------------------------------------------------

    pub(super) fn add_handle(&mut self, node: NodeId, file: File, flags: i32) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        let handle = Handle {
            node,
            file,
            append: flags & libc::O_APPEND != 0,
            sync: flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
        };
        self.handles.insert(fh, handle);
        fh
    }

    pub fn open(&mut self, id: NodeId, flags: i32) -> Res<u64> {
        let path = self.path_of(id).ok_or(libc::ENOENT)?;
        // Always read-write when we may, so that pre-images can be read
        // through the handle; the kernel enforces the caller's access mode.
        // O_APPEND, O_SYNC, O_DSYNC, O_TRUNC are modelled here, O_DIRECT needs
        // nothing (no cache sits in between): the backing open takes none.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .or_else(|_| {
                let mut o = OpenOptions::new();
                match flags & libc::O_ACCMODE {
                    libc::O_WRONLY => o.write(true),
                    libc::O_RDWR => o.read(true).write(true),
                    _ => o.read(true),
                };
                o.open(&path)
            })
            .or_errno()?;
        let fh = self.add_handle(id, file, flags);
        if flags & libc::O_TRUNC != 0 {
            self.truncate(id, Some(fh), 0)?;
        }
        Ok(fh)
    }

    pub fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh) {
            self.maybe_forget(h.node);
        }
    }

    fn handle(&self, fh: u64) -> Res<&Handle> {
        self.handles.get(&fh).ok_or(libc::EBADF)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match h.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(sys::errno(&e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Saves what the change of `[start, end)` of inode `id`, through `file`,
    /// will overwrite. A free function over the node table, so that callers
    /// can lend a handle's file at the same time.
    fn before_change(
        nodes: &mut HashMap<NodeId, Node>,
        id: NodeId,
        file: &File,
        start: u64,
        end: u64,
        written: bool,
    ) -> Res<()> {
        let Some(node) = nodes.get_mut(&id) else {
            return Ok(());
        };
        if node.dead || node.kind != Kind::File {
            return Ok(());
        }
        let undo = match &mut node.data {
            Some(undo) => undo,
            None => node
                .data
                .insert(DataUndo::new(file.metadata().or_errno()?.len())),
        };
        undo.save(file, start, end).or_errno()?;
        if written {
            undo.mark_written(start, end);
        }
        Ok(())
    }

    pub fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Res<u32> {
        use std::os::unix::fs::FileExt;
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        let offset = if h.append {
            h.file.metadata().or_errno()?.len()
        } else {
            offset
        };
        let end = offset.checked_add(data.len() as u64).ok_or(libc::EFBIG)?;
        Self::before_change(&mut self.nodes, h.node, &h.file, offset, end, true)?;
        h.file.write_all_at(data, offset).or_errno()?;
        if h.sync {
            let id = h.node;
            self.fsync(id)?;
        }
        u32::try_from(data.len()).map_err(|_| libc::EINVAL)
    }

    /// Changes the size, through the handle if there is one.
    pub fn truncate(&mut self, id: NodeId, fh: Option<u64>, size: u64) -> Res<()> {
        let own;
        let file = match fh.and_then(|fh| self.handles.get(&fh)) {
            Some(h) => &h.file,
            None => {
                own = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.any_path(id)?)
                    .or_errno()?;
                &own
            }
        };
        let cur = file.metadata().or_errno()?.len();
        Self::before_change(
            &mut self.nodes,
            id,
            file,
            size.min(cur),
            size.max(cur),
            false,
        )?;
        file.set_len(size).or_errno()
    }

    pub fn fallocate(&mut self, fh: u64, offset: u64, len: u64, mode: i32) -> Res<()> {
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        let cur = h.file.metadata().or_errno()?.len();
        let end = offset.saturating_add(len);
        // Plain allocation changes no byte that exists (only the size, past the
        // durable end or past a shrink that saved its pages). Punching or
        // zeroing changes [offset, end); collapsing or inserting moves
        // everything from offset on.
        let shifts = libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE;
        let zeroes = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        let (start, end) = if mode & shifts != 0 {
            (offset, u64::MAX)
        } else if mode & zeroes != 0 {
            (offset, end)
        } else {
            (cur, cur)
        };
        Self::before_change(&mut self.nodes, h.node, &h.file, start, end, false)?;
        sys::fallocate(&h.file, mode, offset, len)
    }

    /// fsync or fdatasync on any descriptor: the data and size are durable.
    pub fn fsync(&mut self, id: NodeId) -> Res<()> {
        self.node_mut(id)?.data = None;
        Ok(())
    }
}
