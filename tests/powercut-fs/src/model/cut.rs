//! The power cut, and its opposite, a full sync.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{missing, CutReport, Kind, Model, NodeId, META, ROOT};
use crate::undo::{DataUndo, Rng};

impl Model {
    // ---- power ----------------------------------------------------------------

    /// Makes everything durable, as a clean shutdown would.
    pub fn sync_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            if let Some(n) = self.nodes.get_mut(id) {
                n.data = None;
            }
        }
        for id in ids {
            let _ = self.fsyncdir(id);
        }
    }

    /// A one-line summary for the control channel.
    pub fn status(&self) -> String {
        let dirty_files = self.nodes.values().filter(|n| n.data.is_some()).count();
        let dirty_dirs = self
            .nodes
            .values()
            .filter(|n| n.entries.durable.is_some())
            .count();
        let buried = self.nodes.values().filter(|n| n.in_grave).count();
        let held: u64 = self
            .nodes
            .values()
            .filter_map(|n| n.data.as_ref())
            .map(DataUndo::held_bytes)
            .sum();
        format!(
            "cuts={} nodes={} dirty_files={dirty_files} dirty_dirs={dirty_dirs} buried={buried} preimage_bytes={held} open_handles={}",
            self.cuts,
            self.nodes.len(),
            self.handles.len()
        )
    }

    /// The power cut: the backing directory becomes what the durable state
    /// says, every handle is closed. With `tear`, unsynced pages are kept or
    /// dropped at random from that seed instead of all dropped.
    pub fn cut(&mut self, tear: Option<u64>) -> io::Result<CutReport> {
        let mut report = CutReport {
            handles_closed: (self.handles.len() + self.dir_handles.len()) as u64,
            ..CutReport::default()
        };
        self.handles.clear();
        self.dir_handles.clear();
        let mut plan = Vec::new();
        let mut seen = HashSet::from([ROOT]);
        self.plan(ROOT, Path::new(""), &mut plan, &mut seen);
        report.dirs_reverted = self
            .nodes
            .values()
            .filter(|n| n.entries.durable.is_some())
            .count() as u64;

        let mut rng = tear.map(Rng::new);
        let files: BTreeSet<NodeId> = plan.iter().map(|(_, id)| *id).collect();
        for id in files {
            let Some(undo) = self.nodes.get_mut(&id).and_then(|n| n.data.take()) else {
                continue;
            };
            let path = self.path_of(id).ok_or_else(|| missing(id))?;
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let r = undo.revert(&file, rng.as_mut())?;
            report.files_reverted += 1;
            report.pages_dropped += r.pages_dropped;
            report.pages_kept += r.pages_kept;
        }

        let next = self.meta.join("next");
        let trash = self.meta.join("trash");
        fs::create_dir(&next)?;
        for (rel, id) in &plan {
            let src = self.path_of(*id).ok_or_else(|| missing(*id))?;
            let dst = next.join(rel);
            if self.nodes.get(id).map(|n| n.kind) == Some(Kind::Dir) {
                let md = fs::symlink_metadata(&src)?;
                fs::DirBuilder::new()
                    .mode(md.mode() & 0o7777)
                    .create(&dst)?;
                std::os::unix::fs::lchown(&dst, Some(md.uid()), Some(md.gid()))?;
            } else {
                fs::hard_link(&src, &dst)?;
            }
        }
        fs::create_dir(&trash)?;
        for entry in fs::read_dir(&self.backing)? {
            let name = entry?.file_name();
            if name != META {
                fs::rename(self.backing.join(&name), trash.join(&name))?;
            }
        }
        for entry in fs::read_dir(&next)? {
            let name = entry?.file_name();
            fs::rename(next.join(&name), self.backing.join(&name))?;
        }
        fs::remove_dir(&next)?;
        fs::remove_dir_all(&trash)?;
        let grave = self.meta.join("grave");
        fs::remove_dir_all(&grave)?;
        fs::create_dir(&grave)?;
        self.cuts += 1;
        self.rescan()?;
        Ok(report)
    }

    /// The durable tree below `dir`, parents before children. A directory
    /// that durable lists name twice (renamed between two unsynced parents)
    /// appears once, at its first place in name order.
    fn plan(
        &self,
        dir: NodeId,
        rel: &Path,
        plan: &mut Vec<(PathBuf, NodeId)>,
        seen: &mut HashSet<NodeId>,
    ) {
        let Some(node) = self.nodes.get(&dir) else {
            return;
        };
        let entries = node
            .entries
            .durable
            .as_ref()
            .unwrap_or(&node.entries.current);
        for (name, id) in entries {
            let child_rel = rel.join(name);
            match self.nodes.get(id).map(|n| n.kind) {
                Some(Kind::Dir) if seen.insert(*id) => {
                    plan.push((child_rel.clone(), *id));
                    self.plan(*id, &child_rel, plan, seen);
                }
                Some(Kind::Dir) | None => {}
                Some(_) => plan.push((child_rel, *id)),
            }
        }
    }
}
