//! The checkpoint's files as a writer owns them: reading either format at
//! open, the three-step commit, and removing what no main file names. The
//! crash reasoning is in the module documentation of the parent.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::format::{self, ReadError};
use super::{
    hour_of_key, Checkpoint, CheckpointError, CheckpointOut, FILE, HOURS_DIR, HOUR_MAGIC,
    HOUR_VERSIONS, MAIN_MAGIC, MAIN_VERSIONS, VERSION,
};
use crate::archive::analytics::HourStats;

/// The main file's body, format 2.
#[derive(Serialize)]
struct MainOut<'a> {
    generation: u64,
    files: &'a BTreeMap<String, u64>,
    hours: BTreeMap<&'a str, u64>,
    unparsed_sealed_through: Option<i64>,
    progress: &'a Value,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MainIn {
    generation: u64,
    files: BTreeMap<String, u64>,
    hours: BTreeMap<String, u64>,
    unparsed_sealed_through: Option<i64>,
    progress: Value,
}

/// An hour file's body: the hour it belongs to (checked against the name
/// it is read under) and its counts.
#[derive(Serialize)]
struct HourOut<'a> {
    hour: &'a str,
    stats: &'a HourStats,
}

#[derive(Deserialize)]
struct HourIn {
    hour: String,
    stats: HourStats,
}

/// An hour file a main file names: its generation and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourRef {
    pub gen: u64,
    pub bytes: u64,
}

/// An open hour whose counts the checkpoint cannot give back: its file is
/// missing or damaged, or its key is no hour this build names.
#[derive(Debug, Clone)]
pub struct UnreadableHour {
    pub key: String,
    /// The hour file the main file names (`None` for a key that is no
    /// hour: no file is looked up for it).
    pub file: Option<PathBuf>,
    /// Whether that file is on disk (damaged, then: a copy is kept).
    pub on_disk: bool,
    pub reason: String,
}

/// What an open read.
#[derive(Debug)]
pub struct Opened {
    /// The readable part: lengths, progress, the readable hours.
    pub cp: Checkpoint,
    /// The main file's format (1: upgraded by the next commit).
    pub version: u32,
    /// The main file's size; the hour files' sizes are [`Store::named`].
    pub main_bytes: u64,
    pub unreadable: Vec<UnreadableHour>,
}

/// What one [`Store::commit`] wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    pub main_bytes: u64,
    /// Hour files written, their bytes, and the largest.
    pub hour_files: u64,
    pub hour_bytes: u64,
    pub largest_hour: u64,
    /// The checkpoint's size now: the main file and every hour file it
    /// names.
    pub total_bytes: u64,
    pub fsyncs: u64,
}

/// The checkpoint files of one archive directory, as its writer sees them:
/// what the durable main file names, and the next generation.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Each hour file the durable main file names, by hour key.
    named: BTreeMap<String, HourRef>,
    /// Named hours whose file does not hold the counts in memory (it could
    /// not be read at open, and the writer rebuilt them): rewritten by the
    /// next commit whatever changed.
    stale: BTreeSet<String>,
    /// Above every generation named or found on disk: a new hour file
    /// never takes the name of an old one.
    next_gen: u64,
    main_bytes: u64,
}

pub(super) struct Loaded {
    pub cp: Checkpoint,
    pub version: u32,
    pub main_bytes: u64,
    pub generation: u64,
    pub named: BTreeMap<String, HourRef>,
    pub unreadable: Vec<UnreadableHour>,
}

/// `<hour>.<gen>.json`
fn hour_file_name(key: &str, gen: u64) -> String {
    format!("{key}.{gen}.json")
}

/// The hour key and generation of an hour file's name (or of its `.tmp`).
fn parse_hour_file_name(name: &str) -> Option<(&str, u64)> {
    let name = name.strip_suffix(".tmp").unwrap_or(name);
    let (key, gen) = name.strip_suffix(".json")?.rsplit_once('.')?;
    Some((key, gen.parse().ok()?))
}

/// Reads the checkpoint; a main file replaced while its hour files were
/// being read (a writer committing under an offline reader, then unlinking
/// the generations the reader wanted) is read again.
pub(super) fn load(dir: &Path) -> Result<Option<Loaded>, CheckpointError> {
    let mut tries = 0;
    loop {
        let Some((l, crc)) = load_once(dir)? else {
            return Ok(None);
        };
        let missing = l.unreadable.iter().any(|u| u.file.is_some() && !u.on_disk);
        let replaced =
            || format::header_crc(&dir.join(FILE), MAIN_MAGIC, MAIN_VERSIONS) != Some(crc);
        if !missing || tries == 5 || !replaced() {
            return Ok(Some(l));
        }
        tries += 1;
    }
}

fn load_once(dir: &Path) -> Result<Option<(Loaded, u32)>, CheckpointError> {
    let path = dir.join(FILE);
    let name = path.display().to_string();
    let main_error = |e: ReadError| match e {
        ReadError::NotFound => {
            CheckpointError::Io(name.clone(), io::Error::from(io::ErrorKind::NotFound))
        }
        ReadError::Io(e) => CheckpointError::Io(name.clone(), e),
        ReadError::Corrupt(m) => CheckpointError::Corrupt(name.clone(), m),
        ReadError::Version(m) => CheckpointError::Version(name.clone(), m),
    };
    let checked = match format::open_checked(&path, MAIN_MAGIC, MAIN_VERSIONS) {
        Ok(c) => c,
        Err(ReadError::NotFound) => return Ok(None),
        Err(e) => return Err(main_error(e)),
    };
    let (version, main_bytes, crc) = (checked.version, checked.len, checked.crc);
    if version == 1 {
        let cp: Checkpoint = format::decode(checked.body).map_err(main_error)?;
        let l = Loaded {
            cp,
            version,
            main_bytes,
            generation: 0,
            named: BTreeMap::new(),
            unreadable: Vec::new(),
        };
        return Ok(Some((l, crc)));
    }
    let main: MainIn = format::decode(checked.body).map_err(main_error)?;
    let mut l = Loaded {
        cp: Checkpoint {
            files: main.files,
            hours: BTreeMap::new(),
            unparsed_sealed_through: main.unparsed_sealed_through,
            progress: main.progress,
        },
        version,
        main_bytes,
        generation: main.generation,
        named: BTreeMap::new(),
        unreadable: Vec::new(),
    };
    for (key, gen) in main.hours {
        // The key becomes a file name: only an hour key this build writes
        // (never `../x`) is looked up, and only such a file ever unlinked.
        if hour_of_key(&key).is_none() {
            l.unreadable.push(UnreadableHour {
                key,
                file: None,
                on_disk: false,
                reason: "not an hour key this build names".into(),
            });
            continue;
        }
        let file = dir.join(HOURS_DIR).join(hour_file_name(&key, gen));
        let unreadable = |reason: String, on_disk: bool| UnreadableHour {
            key: key.clone(),
            file: Some(file.clone()),
            on_disk,
            reason,
        };
        match read_hour(&file, &key) {
            Ok((stats, bytes)) => {
                l.cp.hours.insert(key.clone(), stats);
                l.named.insert(key, HourRef { gen, bytes });
            }
            Err(ReadError::Io(e)) => {
                return Err(CheckpointError::Io(file.display().to_string(), e))
            }
            Err(ReadError::NotFound) => {
                l.unreadable.push(unreadable("missing".into(), false));
                l.named.insert(key, HourRef { gen, bytes: 0 });
            }
            Err(ReadError::Corrupt(m) | ReadError::Version(m)) => {
                let bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
                l.unreadable.push(unreadable(m, true));
                l.named.insert(key, HourRef { gen, bytes });
            }
        }
    }
    Ok(Some((l, crc)))
}

/// One hour file: its counts and size, if it is intact and is `key`'s.
fn read_hour(file: &Path, key: &str) -> Result<(HourStats, u64), ReadError> {
    let checked = format::open_checked(file, HOUR_MAGIC, HOUR_VERSIONS)?;
    let len = checked.len;
    let body: HourIn = format::decode(checked.body)?;
    if body.hour != key {
        return Err(ReadError::Corrupt(format!("holds hour {:?}", body.hour)));
    }
    Ok((body.stats, len))
}

impl Store {
    /// Reads `dir`'s checkpoint for its writer: `None` for the checkpoint
    /// when there is none. Hour files that are missing or damaged are
    /// returned in [`Opened::unreadable`] (the writer rebuilds those hours
    /// from their files; the next commit writes them again), not as an
    /// error. Creates `checkpoint.d/` (durably) if it is missing; removes
    /// nothing ([`Store::remove_unnamed`] does, once the writer has decided
    /// to start).
    pub fn open(dir: &Path) -> Result<(Store, Option<Opened>), CheckpointError> {
        let hours_dir = dir.join(HOURS_DIR);
        crate::storage::durable::create_dir_durable(&hours_dir)
            .map_err(|e| CheckpointError::Io(hours_dir.display().to_string(), e))?;
        let loaded = load(dir)?;
        let mut store = Store {
            dir: dir.to_path_buf(),
            named: BTreeMap::new(),
            stale: BTreeSet::new(),
            next_gen: 1,
            main_bytes: 0,
        };
        let Some(l) = loaded else {
            store.raise_next_gen()?;
            return Ok((store, None));
        };
        store.named = l.named;
        store.stale = l.unreadable.iter().map(|u| u.key.clone()).collect();
        store.next_gen = l.generation + 1;
        store.raise_next_gen()?;
        store.main_bytes = l.main_bytes;
        let opened = Opened {
            cp: l.cp,
            version: l.version,
            main_bytes: l.main_bytes,
            unreadable: l.unreadable,
        };
        Ok((store, Some(opened)))
    }

    /// Raises the next generation above every hour file on disk (a commit
    /// cut short before its main file's rename left one above the main
    /// file's generation): a new file never takes an old file's name.
    fn raise_next_gen(&mut self) -> Result<(), CheckpointError> {
        let hours_dir = self.dir.join(HOURS_DIR);
        let io_err = |e| CheckpointError::Io(hours_dir.display().to_string(), e);
        for entry in std::fs::read_dir(&hours_dir).map_err(io_err)? {
            let name = entry.map_err(io_err)?.file_name();
            if let Some((_, gen)) = name.to_str().and_then(parse_hour_file_name) {
                self.next_gen = self.next_gen.max(gen.saturating_add(1));
            }
        }
        Ok(())
    }

    /// The hour files the durable main file names.
    pub fn named(&self) -> &BTreeMap<String, HourRef> {
        &self.named
    }

    /// The checkpoint's size: the main file and every hour file it names.
    pub fn total_bytes(&self) -> u64 {
        self.main_bytes + self.named.values().map(|r| r.bytes).sum::<u64>()
    }

    /// Removes every file in `checkpoint.d/` that the durable main file
    /// does not name: new generations of a commit that died before its
    /// main file's rename, old ones a commit died before unlinking, and
    /// `.tmp` files. Then fsyncs the directory, so that a removed name
    /// cannot come back. Returns the number removed.
    pub fn remove_unnamed(&mut self) -> io::Result<usize> {
        let hours_dir = self.dir.join(HOURS_DIR);
        let mut removed = 0;
        for entry in std::fs::read_dir(&hours_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((key, gen)) = parse_hour_file_name(name) else {
                continue; // not ours: left alone
            };
            let named =
                !name.ends_with(".tmp") && self.named.get(key).is_some_and(|r| r.gen == gen);
            if !named && entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            crate::storage::durable::sync_dir(&hours_dir)?;
        }
        Ok(removed)
    }

    /// Makes `out` the durable checkpoint (see the parent module for the
    /// order and what a death leaves). When this returns Ok, `out` survives
    /// a power cut. A failed fsync comes back as
    /// `durable::is_fsync_failure`: the caller must not read the
    /// checkpoint back in this process.
    pub fn commit(&mut self, out: &CheckpointOut) -> io::Result<Written> {
        let gen = self.next_gen;
        let hours_dir = self.dir.join(HOURS_DIR);
        let mut w = Written::default();
        let mut named = BTreeMap::new();
        // Step 1: the changed hours' files, each under a name no main file
        // has ever used (this commit's generation).
        for (key, &(stats, changed)) in &out.hours {
            match self.named.get(key) {
                Some(&r) if !changed && !self.stale.contains(key) => {
                    named.insert(key.as_str(), r);
                }
                _ => {
                    let bytes = format::encode(HOUR_MAGIC, 1, &HourOut { hour: key, stats })?;
                    let path = hours_dir.join(hour_file_name(key, gen));
                    // tmp, fsync, rename; dying before the rename leaves a
                    // `.tmp` (garbage); after it, a file no main names yet.
                    crate::storage::durable::replace_file(&path, &bytes)?;
                    w.hour_files += 1;
                    w.hour_bytes += bytes.len() as u64;
                    w.largest_hour = w.largest_hour.max(bytes.len() as u64);
                    w.fsyncs += 1;
                    named.insert(
                        key.as_str(),
                        HourRef {
                            gen,
                            bytes: bytes.len() as u64,
                        },
                    );
                }
            }
        }
        if w.hour_files > 0 {
            // One directory fsync for all of them: the new names are
            // durable before the main file that names them can be.
            crate::storage::durable::sync_dir(&hours_dir)?;
            w.fsyncs += 1;
        }
        // Dying here: the old main file names the old generations, all
        // still on disk; the new ones are garbage at the next open.
        crate::archive::debug_pause("checkpoint");
        // Step 2: `checkpoint.tmp`, fsync, rename, directory fsync.
        let main = MainOut {
            generation: gen,
            files: &out.files,
            hours: named.iter().map(|(k, r)| (*k, r.gen)).collect(),
            unparsed_sealed_through: out.unparsed_sealed_through,
            progress: out.progress,
        };
        let bytes = format::encode(MAIN_MAGIC, VERSION, &main)?;
        crate::storage::durable::write_file_durable(&self.dir.join(FILE), &bytes)?;
        w.main_bytes = bytes.len() as u64;
        w.fsyncs += 2;
        // Committed. Step 3: the generations the durable main file no
        // longer names. Dying before an unlink leaves garbage for the next
        // open; an unlink that fails is only logged, for the same reason.
        for (key, r) in &self.named {
            if named.get(key.as_str()) != Some(r) {
                let path = hours_dir.join(hour_file_name(key, r.gen));
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(file = %path.display(), error = %e,
                        "archive: cannot remove a checkpoint hour file no longer named; the next start removes it"),
                }
            }
        }
        self.named = named.into_iter().map(|(k, r)| (k.to_string(), r)).collect();
        self.stale.clear();
        self.next_gen = gen + 1;
        self.main_bytes = w.main_bytes;
        w.total_bytes = self.total_bytes();
        Ok(w)
    }
}
