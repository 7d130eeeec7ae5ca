//! The undo log of one file's data: what a power cut would bring back.
//!
//! The backing file always holds the current bytes (what the page cache shows).
//! From the first change after an fsync or fdatasync, [`DataUndo`] keeps the
//! durable size and, for every 4 KiB page of the durable content that a change
//! touches, the page as it was (its pre-image), read once before the first
//! change. Pages past the durable size need no pre-image: a cut truncates them
//! away. So an append-only writer costs one pre-image (the page holding the
//! durable end) per sync interval, and no work proportional to the file size.
//!
//! A cut either restores the durable state exactly ([`DataUndo::revert`]) or
//! tears it: each changed page independently keeps its new bytes or gets its
//! old ones back, as a disk that persisted part of a write would leave it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The unit in which a cut keeps or drops unsynced data.
pub const PAGE: u64 = 4096;

/// Undo state of a file changed since its last sync.
#[derive(Debug)]
pub struct DataUndo {
    /// The file size at the last sync.
    durable_size: u64,
    /// Pre-images of durable pages changed since: page index to the bytes of
    /// `[index * PAGE, min((index + 1) * PAGE, durable_size))`.
    pre: BTreeMap<u64, Vec<u8>>,
    /// Pages written since the last sync, past the durable size too: the pages
    /// a torn cut may keep.
    written: BTreeSet<u64>,
}

/// A seeded generator (splitmix64), so that a torn cut is reproducible.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// What a cut did to one file, for the cut report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reverted {
    /// Pages given back their durable bytes (or zeros past the durable end).
    pub pages_dropped: u64,
    /// Changed pages a torn cut kept.
    pub pages_kept: u64,
}

fn pages(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    start / PAGE..=(end - 1) / PAGE
}

impl DataUndo {
    /// The undo state of a file whose durable size is `durable_size` and
    /// whose durable bytes are its current bytes.
    pub fn new(durable_size: u64) -> Self {
        DataUndo {
            durable_size,
            pre: BTreeMap::new(),
            written: BTreeSet::new(),
        }
    }

    /// Saves the durable bytes of `[start, end)` that are not saved yet, read
    /// from `file` before they change. Call it before every change to the
    /// bytes or the size of the file.
    pub fn save(&mut self, file: &File, start: u64, end: u64) -> io::Result<()> {
        let end = end.min(self.durable_size);
        if start >= end {
            return Ok(());
        }
        for page in pages(start, end) {
            if self.pre.contains_key(&page) {
                continue;
            }
            let off = page * PAGE;
            let len = PAGE.min(self.durable_size - off) as usize;
            let mut buf = vec![0u8; len];
            // A short read leaves zeros: the file was shorter than its durable
            // size, which only a truncate does, and that saved these pages.
            let mut got = 0;
            while got < len {
                match file.read_at(&mut buf[got..], off + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.pre.insert(page, buf);
        }
        Ok(())
    }

    /// Records that `[start, end)` was written (for a torn cut).
    pub fn mark_written(&mut self, start: u64, end: u64) {
        if start < end {
            self.written.extend(pages(start, end));
        }
    }

    /// Bytes held in pre-images.
    pub fn held_bytes(&self) -> u64 {
        self.pre.values().map(|p| p.len() as u64).sum()
    }

    /// Gives `file` its durable size and bytes back. With `tear`, each changed
    /// page is instead kept or dropped at random (see the module doc).
    pub fn revert(self, file: &File, tear: Option<&mut Rng>) -> io::Result<Reverted> {
        let Some(rng) = tear else {
            file.set_len(self.durable_size)?;
            for (page, bytes) in &self.pre {
                file.write_all_at(bytes, page * PAGE)?;
            }
            return Ok(Reverted {
                pages_dropped: self.pre.len() as u64 + self.written.len() as u64,
                pages_kept: 0,
            });
        };
        self.tear(file, rng)
    }

    fn tear(self, file: &File, rng: &mut Rng) -> io::Result<Reverted> {
        let cur = file.metadata()?.len();
        let durable = self.durable_size;
        let changed: BTreeSet<u64> = self
            .pre
            .keys()
            .chain(self.written.iter())
            .copied()
            .collect();
        let mut kept = BTreeSet::new();
        for page in &changed {
            if rng.coin() {
                kept.insert(*page);
            }
        }
        // The size: past the durable end, as far as the last kept page that
        // lies (partly) past it; after a shrink, either size.
        let size = if cur >= durable {
            kept.iter()
                .filter(|p| (*p + 1) * PAGE > durable && self.written.contains(p))
                .map(|p| ((p + 1) * PAGE).min(cur))
                .fold(durable, u64::max)
        } else if rng.coin() {
            cur
        } else {
            durable
        };
        file.set_len(size)?;
        let mut report = Reverted::default();
        for page in &changed {
            if kept.contains(page) {
                report.pages_kept += 1;
                continue;
            }
            report.pages_dropped += 1;
            let off = page * PAGE;
            if off >= size {
                continue;
            }
            let end = ((page + 1) * PAGE).min(size);
            // Below the durable end: the pre-image (if the page has one; a page
            // written only past the durable end has its durable part intact).
            let mut from = off;
            if let Some(bytes) = self.pre.get(page) {
                let n = (bytes.len() as u64).min(end - off) as usize;
                file.write_all_at(&bytes[..n], off)?;
                from = off + n as u64;
            }
            // Past it: zeros, as unwritten blocks read.
            let from = from.max(durable.min(end));
            if from < end {
                file.write_all_at(&vec![0u8; (end - from) as usize], from)?;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "powercut-undo-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    fn contents(f: &File) -> Vec<u8> {
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    fn write(undo: &mut DataUndo, f: &File, off: u64, bytes: &[u8]) {
        let end = off + bytes.len() as u64;
        undo.save(f, off, end).unwrap();
        undo.mark_written(off, end);
        f.write_all_at(bytes, off).unwrap();
    }

    #[test]
    fn revert_restores_overwrites_appends_and_truncates() {
        let durable: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let f = temp_file(&durable);
        let mut undo = DataUndo::new(durable.len() as u64);
        write(&mut undo, &f, 5000, &[0xAA; 100]);
        write(&mut undo, &f, 9_990, &[0xBB; 5000]);
        undo.save(&f, 3000, 15_000).unwrap();
        f.set_len(3000).unwrap();
        write(&mut undo, &f, 3000, &[0xCC; 20]);
        undo.revert(&f, None).unwrap();
        assert_eq!(contents(&f), durable);
    }

    #[test]
    fn appends_save_at_most_the_page_holding_the_durable_end() {
        let f = temp_file(&[7u8; 3 * PAGE as usize + 10]);
        let mut undo = DataUndo::new(3 * PAGE + 10);
        // The first write rewrites the last 5 durable bytes, the rest append.
        for i in 0..100u64 {
            write(&mut undo, &f, 3 * PAGE + 5 + i * 4096, &[1u8; 4096]);
        }
        assert_eq!(
            undo.held_bytes(),
            10,
            "one partial page, whatever was appended"
        );
    }

    #[test]
    fn a_tear_is_a_mix_of_old_and_new_pages_and_reproducible() {
        let old = vec![1u8; 8 * PAGE as usize];
        let run = |seed| {
            let f = temp_file(&old);
            let mut undo = DataUndo::new(old.len() as u64);
            write(&mut undo, &f, 0, &vec![2u8; 16 * PAGE as usize]);
            undo.revert(&f, Some(&mut Rng::new(seed))).unwrap();
            contents(&f)
        };
        let torn = run(42);
        assert_eq!(torn, run(42), "same seed, same tear");
        assert!(torn.len() >= old.len() && torn.len() <= 16 * PAGE as usize);
        for (i, page) in torn.chunks(PAGE as usize).enumerate() {
            let first = page[0];
            assert!(page.iter().all(|b| *b == first), "page {i} is whole");
            let allowed: &[u8] = if i < 8 { &[1, 2] } else { &[0, 2] };
            assert!(allowed.contains(&first), "page {i} holds {first}");
        }
        let pages: Vec<u8> = torn.chunks(PAGE as usize).map(|p| p[0]).collect();
        assert!(pages.contains(&1) && pages.contains(&2), "{pages:?}");
    }
}
