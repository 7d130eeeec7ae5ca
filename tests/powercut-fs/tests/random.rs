//! Random file operations on the mount, checked against a small reference
//! model of POSIX durability: after every operation, the mount shows the
//! current state; after every cut, exactly the durable one.
//!
//! The reference is deliberately naive: whole copies of each inode's current
//! and durable bytes, and of each directory's current and durable entries.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

use common::{fsync_dir, read, Mount};

const DIRS: [&str; 2] = ["", "d"];
const NAMES: [&str; 4] = ["a", "b", "c", "e"];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Inode {
    cur: Vec<u8>,
    dur: Vec<u8>,
}

#[derive(Default, Clone)]
struct Entries {
    cur: BTreeMap<&'static str, usize>,
    dur: BTreeMap<&'static str, usize>,
}

#[derive(Default)]
struct Reference {
    inodes: Vec<Inode>,
    dirs: [Entries; 2],
}

impl Reference {
    fn cut(&mut self) {
        for d in &mut self.dirs {
            d.cur = d.dur.clone();
        }
        for i in &mut self.inodes {
            i.cur = i.dur.clone();
        }
    }
}

fn path(m: &Mount, dir: usize, name: &str) -> PathBuf {
    m.mnt.join(DIRS[dir]).join(name)
}

/// The mount shows the reference's current state: names, bytes, and which
/// names share an inode.
fn check(m: &Mount, r: &Reference, step: usize) {
    for (dir, entries) in r.dirs.iter().enumerate() {
        let mut names: Vec<String> = fs::read_dir(m.mnt.join(DIRS[dir]))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !(dir == 0 && n == "d"))
            .collect();
        names.sort();
        let want: Vec<&str> = entries.cur.keys().copied().collect();
        assert_eq!(names, want, "step {step}: names in /{}", DIRS[dir]);
        for (name, ino) in &entries.cur {
            let p = path(m, dir, name);
            assert_eq!(
                read(&p),
                r.inodes[*ino].cur,
                "step {step}: bytes of {}",
                p.display()
            );
        }
    }
    let mut real_ino: BTreeMap<usize, u64> = BTreeMap::new();
    for (dir, entries) in r.dirs.iter().enumerate() {
        for (name, ino) in &entries.cur {
            let st = fs::metadata(path(m, dir, name)).unwrap().ino();
            let first = *real_ino.entry(*ino).or_insert(st);
            assert_eq!(
                first, st,
                "step {step}: /{}/{name} is a link of another name",
                DIRS[dir]
            );
        }
    }
}

fn pick(rng: &mut Rng) -> (usize, &'static str) {
    (
        rng.below(2) as usize,
        NAMES[rng.below(NAMES.len() as u64) as usize],
    )
}

fn run(seed: u64, steps: usize) {
    let Some(m) = Mount::new() else { return };
    let mut rng = Rng(seed);
    let mut r = Reference::default();
    fs::create_dir(m.mnt.join("d")).unwrap();
    fsync_dir(&m.mnt);
    let mut cuts = 0;
    for step in 0..steps {
        let (dir, name) = pick(&mut rng);
        let existing = r.dirs[dir].cur.get(name).copied();
        let p = path(&m, dir, name);
        match (rng.below(22), existing) {
            (0..=2, None) => {
                File::create_new(&p).unwrap();
                r.inodes.push(Inode::default());
                r.dirs[dir].cur.insert(name, r.inodes.len() - 1);
            }
            (3..=6, Some(ino)) => {
                let off = rng.below(12_000) as usize;
                let len = 1 + rng.below(6000) as usize;
                let byte = rng.next() as u8;
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .write_all_at(&vec![byte; len], off as u64)
                    .unwrap();
                let cur = &mut r.inodes[ino].cur;
                if cur.len() < off + len {
                    cur.resize(off + len, 0);
                }
                cur[off..off + len].fill(byte);
            }
            (7, Some(ino)) => {
                let bytes = vec![rng.next() as u8; 1 + rng.below(3000) as usize];
                OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .unwrap()
                    .write_all(&bytes)
                    .unwrap();
                r.inodes[ino].cur.extend_from_slice(&bytes);
            }
            (8, Some(ino)) => {
                let len = rng.below(12_000) as usize;
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len as u64)
                    .unwrap();
                r.inodes[ino].cur.resize(len, 0);
            }
            (9..=10, Some(ino)) => {
                let f = File::open(&p).unwrap();
                if rng.below(2) == 0 {
                    f.sync_all().unwrap();
                } else {
                    f.sync_data().unwrap();
                }
                r.inodes[ino].dur = r.inodes[ino].cur.clone();
            }
            (11..=13, _) => {
                fsync_dir(&m.mnt.join(DIRS[dir]));
                r.dirs[dir].dur = r.dirs[dir].cur.clone();
            }
            (14..=15, Some(_)) => {
                fs::remove_file(&p).unwrap();
                r.dirs[dir].cur.remove(name);
            }
            (16..=18, Some(ino)) => {
                let (to_dir, to) = pick(&mut rng);
                fs::rename(&p, path(&m, to_dir, to)).unwrap();
                // Renaming onto another name of the same inode does nothing.
                if r.dirs[to_dir].cur.get(to) != Some(&ino) {
                    r.dirs[dir].cur.remove(name);
                    r.dirs[to_dir].cur.insert(to, ino);
                }
            }
            (19, Some(ino)) => {
                let (to_dir, to) = pick(&mut rng);
                if !r.dirs[to_dir].cur.contains_key(to) {
                    fs::hard_link(&p, path(&m, to_dir, to)).unwrap();
                    r.dirs[to_dir].cur.insert(to, ino);
                }
            }
            (20..=21, _) => {
                m.cut(None);
                r.cut();
                cuts += 1;
                assert!(m.status().contains("buried=0"), "{}", m.status());
            }
            _ => {}
        }
        check(&m, &r, step);
    }
    assert!(cuts > 5, "seed {seed}: only {cuts} cuts");
}

/// Six seeds by default; POWERCUT_RANDOM_SEEDS=N runs N for a long check.
#[test]
fn random_operations_match_the_reference_before_and_after_each_cut() {
    let seeds = std::env::var("POWERCUT_RANDOM_SEEDS").map_or(6, |s| s.parse().expect("a number"));
    for seed in 1..=seeds {
        run(seed, 400);
    }
}
