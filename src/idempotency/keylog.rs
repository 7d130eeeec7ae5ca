//! `DATA_DIR/idempotency.log`: the Idempotency-Key index's checkpoint, an
//! append-only file of its own (issue 26 item 3: in sled, the rows cost 1x
//! to 3x their size again in memory outside sled's cache, 238 MiB of RSS at
//! the default `max-bytes`; here they cost nothing in memory, and reading
//! the file at open holds only the live rows).
//!
//! Format: the 16-byte [`MAGIC`] (its last byte is the version), then
//! frames `len: u32 LE ‖ crc32(body): u32 LE ‖ body`, where `body` is a
//! kind byte and its fields:
//! - [`PUT`]: `first_seq: u64 LE ‖ key_len: u16 LE ‖ key ‖ encoded entry`
//!   (a later put of a key replaces an earlier one);
//! - [`DEL`]: `key` (the key was forgotten);
//! - [`WATERMARK`]: `through: u64 LE` ("every key accepted at or below this
//!   seq is in the frames before this one").
//!
//! A checkpoint appends its deletions, its new rows and its watermark with
//! one `write` stream and one fdatasync, before the offset commit's flush
//! and fsync (the caller's order, see `Index::checkpoint`). When the file
//! has grown past twice what the live rows take (and at least
//! [`COMPACT_MIN_BYTES`]), or after a failed append, the checkpoint writes
//! the whole index instead into `idempotency.log.tmp`, fsyncs it, renames
//! it over the log and fsyncs the directory: the index in memory is the
//! truth, never what a failed write left in the page cache.
//!
//! What a death leaves:
//! - during an append: a torn last frame after the previous checkpoint's
//!   watermark. Open keeps every frame up to the last whole one and cuts
//!   the rest (logged with its offset and length): nothing cut was covered
//!   by an offset commit, since the commit's flush follows the fdatasync;
//! - during a rewrite: the old log and a `.tmp` (removed at open); after
//!   the rename, the new log.
//!
//! A frame in the middle that does not check (the disk returned something
//! else than was written) ends the read the same way: the keys after it are
//! forgotten (counted as undecodable entries and logged with the byte
//! range), and the WAL rescan from the last good watermark finds those whose
//! records are still there. Forgetting a key costs a duplicate on a retry,
//! never a lost event.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::storage::durable;

/// 15 bytes of name and the format version.
const MAGIC: &[u8; 16] = b"sluice-idem-log\x01";
const PUT: u8 = 1;
const DEL: u8 = 2;
const WATERMARK: u8 = 3;
/// A frame longer than this is damage: a key is at most 271 bytes and an
/// entry (with a version-1 answer of up to 16 KiB) well under this.
const MAX_FRAME: u32 = 1 << 20;
/// The log is rewritten from the index once it passes twice the live rows'
/// cost and at least this.
pub const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// What [`KeyLog::open`] read.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Live rows: map key → (first seq, encoded entry).
    pub rows: HashMap<Vec<u8>, (u64, Vec<u8>)>,
    /// The last watermark read (0 when none).
    pub watermark: u64,
    /// The file did not exist: it was created empty.
    pub created: bool,
    /// Bytes cut at the end (a torn append, or damage): offset, length, why.
    pub cut: Option<(u64, u64, String)>,
}

pub struct KeyLog {
    path: PathBuf,
    file: File,
    /// Bytes in the file that every frame before them checks.
    len: u64,
    /// An append failed: the file may hold a partial frame, and after a
    /// failed fdatasync the page cache cannot be trusted. The next
    /// checkpoint rewrites the log whole from the index.
    pub needs_rewrite: bool,
    /// Tests: fail the next append or rewrite, as a full disk would.
    #[cfg(test)]
    pub fail_next: bool,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut t = path.as_os_str().to_owned();
    t.push(".tmp");
    PathBuf::from(t)
}

impl KeyLog {
    /// Opens (or creates, durably) the log at `path` and reads it.
    pub fn open(path: &Path) -> io::Result<(KeyLog, Loaded)> {
        match std::fs::remove_file(tmp_path(path)) {
            Ok(()) => {
                tracing::info!(path = %tmp_path(path).display(), "removed an unfinished idempotency log rewrite")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if !path.exists() {
            durable::write_file_durable(path, MAGIC)?;
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            let log = KeyLog {
                path: path.to_owned(),
                file,
                len: MAGIC.len() as u64,
                needs_rewrite: false,
                #[cfg(test)]
                fail_next: false,
            };
            let loaded = Loaded {
                created: true,
                ..Loaded::default()
            };
            return Ok((log, loaded));
        }
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        let mut loaded = Loaded::default();
        let mut magic = [0u8; 16];
        let head = if size >= MAGIC.len() as u64 {
            file.read_exact(&mut magic)?;
            &magic[..]
        } else {
            &[][..]
        };
        if head != MAGIC {
            if head.len() == MAGIC.len() && head[..15] == MAGIC[..15] {
                // Ours, of another version: a newer build's. Refused, not
                // moved: a downgrade must not forget its keys silently.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is an idempotency log of version {}; this build reads version {}",
                        path.display(),
                        head[15],
                        MAGIC[15]
                    ),
                ));
            }
            // Not an idempotency log at all (empty, cut inside its magic,
            // overwritten): moved aside, and a fresh log started. The caller
            // sees a cut from 0 and rescans the WAL.
            drop(file);
            let quarantine = path.with_file_name(format!(
                "{}.damaged-{}",
                path.file_name()
                    .map_or_else(|| "log".into(), |n| n.to_string_lossy()),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ));
            durable::rename_durable(path, &quarantine)?;
            let (log, mut fresh) = KeyLog::open(path)?;
            fresh.cut = Some((
                0,
                size,
                format!(
                    "not an idempotency log ({size} bytes, first bytes {:?}); moved to {}",
                    String::from_utf8_lossy(head),
                    quarantine.display()
                ),
            ));
            return Ok((log, fresh));
        }
        let mut r = BufReader::with_capacity(64 << 10, &mut file);
        let mut at = MAGIC.len() as u64;
        let mut body = Vec::new();
        let why = loop {
            if at == size {
                break None;
            }
            let mut head = [0u8; 8];
            if size - at < 8 || r.read_exact(&mut head).is_err() {
                break Some("a frame head cut short".to_string());
            }
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            if len == 0 || len > MAX_FRAME {
                break Some(format!("a frame length of {len} bytes"));
            }
            if size - at - 8 < u64::from(len) {
                break Some("a frame cut short".to_string());
            }
            body.resize(len as usize, 0);
            if r.read_exact(&mut body).is_err() {
                break Some("a frame cut short".to_string());
            }
            if crc32fast::hash(&body) != crc {
                break Some("a frame whose checksum does not match".to_string());
            }
            if let Err(e) = apply(&body, &mut loaded) {
                break Some(e);
            }
            at += 8 + u64::from(len);
        };
        drop(r);
        if let Some(why) = why {
            // Dying here: the cut is redone at the next open.
            file.set_len(at)?;
            durable::sync_file(&file, path)?;
            loaded.cut = Some((at, size - at, why));
        }
        file.seek(SeekFrom::Start(at))?;
        let log = KeyLog {
            path: path.to_owned(),
            file,
            len: at,
            needs_rewrite: false,
            #[cfg(test)]
            fail_next: false,
        };
        Ok((log, loaded))
    }

    fn injected_failure(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next) {
            return Err(io::Error::other("injected idempotency log failure"));
        }
        Ok(())
    }

    /// Bytes of whole frames in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log should be rewritten from `live_bytes` of rows.
    pub fn wants_rewrite(&self, live_bytes: u64) -> bool {
        self.needs_rewrite || self.len > COMPACT_MIN_BYTES.max(live_bytes.saturating_mul(2))
    }

    /// Appends `dels`, `puts` and the watermark, then fdatasyncs. On an
    /// error the log is marked for a rewrite (what was written is never
    /// trusted) and the caller keeps its rows for the next checkpoint.
    pub fn append<'a>(
        &mut self,
        dels: impl Iterator<Item = &'a [u8]>,
        puts: impl Iterator<Item = (&'a [u8], u64, &'a [u8])>,
        watermark: u64,
    ) -> io::Result<()> {
        let r = self.append_inner(dels, puts, watermark);
        if r.is_err() {
            self.needs_rewrite = true;
        }
        r
    }

    fn append_inner<'a>(
        &mut self,
        dels: impl Iterator<Item = &'a [u8]>,
        puts: impl Iterator<Item = (&'a [u8], u64, &'a [u8])>,
        watermark: u64,
    ) -> io::Result<()> {
        if self.needs_rewrite {
            return Err(io::Error::other(
                "the idempotency log needs a rewrite after a failed write",
            ));
        }
        self.injected_failure()?;
        self.file.seek(SeekFrom::Start(self.len))?;
        let mut w = FrameWriter::new(&self.file);
        for k in dels {
            w.del(k)?;
        }
        for (k, first_seq, v) in puts {
            w.put(k, first_seq, v)?;
        }
        w.watermark(watermark)?;
        let written = w.finish()?;
        // Dying before the fdatasync returns: the frames may be torn; no
        // offset commit has covered them (its flush follows this).
        durable::sync_file_data(&self.file, &self.path)?;
        self.len += written;
        Ok(())
    }

    /// Replaces the log with `puts` and the watermark: tmp, fsync, rename,
    /// directory fsync. Clears a pending rewrite when it succeeds.
    pub fn rewrite<'a>(
        &mut self,
        puts: impl Iterator<Item = (&'a [u8], u64, &'a [u8])>,
        watermark: u64,
    ) -> io::Result<()> {
        self.injected_failure()?;
        let mut written = 0;
        durable::write_file_durable_with(&self.path, |f| {
            f.write_all(MAGIC)?;
            let mut w = FrameWriter::new(f);
            for (k, first_seq, v) in puts {
                w.put(k, first_seq, v)?;
            }
            w.watermark(watermark)?;
            written = w.finish()?;
            Ok(())
        })?;
        // The rename is durable: the new file is the log.
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.len = MAGIC.len() as u64 + written;
        self.needs_rewrite = false;
        Ok(())
    }
}

/// Applies one checked frame body to `loaded`.
fn apply(body: &[u8], loaded: &mut Loaded) -> Result<(), String> {
    let (&kind, rest) = body.split_first().ok_or("an empty frame")?;
    match kind {
        PUT => {
            if rest.len() < 10 {
                return Err("a put frame cut short".into());
            }
            let (seq, rest) = rest.split_at(8);
            let (klen, rest) = rest.split_at(2);
            let first_seq = u64::from_le_bytes(seq.try_into().map_err(|_| "seq")?);
            let klen = usize::from(u16::from_le_bytes([klen[0], klen[1]]));
            if klen == 0 || klen > rest.len() {
                return Err(format!("a put frame with a key of {klen} bytes"));
            }
            let (k, v) = rest.split_at(klen);
            loaded.rows.insert(k.to_vec(), (first_seq, v.to_vec()));
        }
        DEL => {
            loaded.rows.remove(rest);
        }
        WATERMARK => {
            let w: [u8; 8] = rest
                .try_into()
                .map_err(|_| "a watermark frame of the wrong length")?;
            loaded.watermark = u64::from_le_bytes(w);
        }
        other => return Err(format!("a frame of unknown kind {other}")),
    }
    Ok(())
}

/// Frames written through a buffer; counts the bytes.
struct FrameWriter<W: Write> {
    w: BufWriter<W>,
    body: Vec<u8>,
    written: u64,
}

impl<W: Write> FrameWriter<W> {
    fn new(w: W) -> Self {
        FrameWriter {
            w: BufWriter::with_capacity(64 << 10, w),
            body: Vec::new(),
            written: 0,
        }
    }

    fn frame(&mut self) -> io::Result<()> {
        let len = u32::try_from(self.body.len())
            .ok()
            .filter(|&l| l <= MAX_FRAME)
            .ok_or_else(|| io::Error::other("an idempotency log frame over 1 MiB"))?;
        self.w.write_all(&len.to_le_bytes())?;
        self.w
            .write_all(&crc32fast::hash(&self.body).to_le_bytes())?;
        self.w.write_all(&self.body)?;
        self.written += 8 + u64::from(len);
        Ok(())
    }

    fn put(&mut self, key: &[u8], first_seq: u64, value: &[u8]) -> io::Result<()> {
        let klen = u16::try_from(key.len()).map_err(|_| io::Error::other("key too long"))?;
        self.body.clear();
        self.body.push(PUT);
        self.body.extend_from_slice(&first_seq.to_le_bytes());
        self.body.extend_from_slice(&klen.to_le_bytes());
        self.body.extend_from_slice(key);
        self.body.extend_from_slice(value);
        self.frame()
    }

    fn del(&mut self, key: &[u8]) -> io::Result<()> {
        self.body.clear();
        self.body.push(DEL);
        self.body.extend_from_slice(key);
        self.frame()
    }

    fn watermark(&mut self, through: u64) -> io::Result<()> {
        self.body.clear();
        self.body.push(WATERMARK);
        self.body.extend_from_slice(&through.to_le_bytes());
        self.frame()
    }

    fn finish(mut self) -> io::Result<u64> {
        self.w.flush()?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "idempotency.log";

    fn open(p: &Path) -> (KeyLog, Loaded) {
        KeyLog::open(p).unwrap()
    }

    /// One checkpoint of one row.
    fn put(log: &mut KeyLog, key: &[u8], seq: u64, value: &[u8], watermark: u64) {
        log.append(
            std::iter::empty(),
            [(key, seq, value)].into_iter(),
            watermark,
        )
        .unwrap();
    }

    #[test]
    fn appends_replay_in_order_and_rewrites_keep_only_live_rows() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        let (mut log, l) = open(&p);
        assert!(l.created);
        log.append(
            std::iter::empty(),
            [(&b"a"[..], 1, &b"A1"[..]), (&b"b"[..], 2, &b"B"[..])].into_iter(),
            2,
        )
        .unwrap();
        log.append(
            [&b"b"[..]].into_iter(),
            [(&b"a"[..], 3, &b"A3"[..])].into_iter(),
            5,
        )
        .unwrap();
        let grown = log.len();
        drop(log);
        let (mut log, l) = open(&p);
        assert_eq!(l.watermark, 5);
        assert_eq!(l.rows.len(), 1);
        assert_eq!(l.rows[&b"a"[..]], (3, b"A3".to_vec()));
        assert!(l.cut.is_none());
        log.rewrite([(&b"a"[..], 3, &b"A3"[..])].into_iter(), 5)
            .unwrap();
        assert!(log.len() < grown);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), log.len());
        drop(log);
        let (_, l) = open(&p);
        assert_eq!((l.watermark, l.rows.len()), (5, 1));
    }

    /// Every byte class of the file damaged: the magic refuses the file; a
    /// damaged frame ends the read there, the rest is cut (and reported),
    /// what came before is kept, and the log takes appends again.
    #[test]
    fn a_damaged_byte_anywhere_cuts_from_its_frame_and_nothing_before() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        let (mut log, _) = open(&p);
        put(&mut log, b"a", 1, b"A", 1);
        let first = log.len();
        put(&mut log, b"b", 2, b"B", 2);
        drop(log);
        let whole = std::fs::read(&p).unwrap();
        // Frame starts: put a, watermark 1, put b, watermark 2; and the
        // state each leaves behind it (rows, watermark).
        let mut starts = vec![16usize];
        while *starts.last().unwrap() < whole.len() {
            let at = *starts.last().unwrap();
            let len = u32::from_le_bytes(whole[at..at + 4].try_into().unwrap()) as usize;
            starts.push(at + 8 + len);
        }
        assert_eq!(starts.len(), 5);
        assert_eq!(starts[2] as u64, first);
        let before = [(0, 0), (1, 0), (1, 1), (2, 1)];
        for i in 0..whole.len() {
            let mut bad = whole.clone();
            bad[i] ^= 0x5a;
            std::fs::write(&p, &bad).unwrap();
            match KeyLog::open(&p) {
                // The version byte: a newer build's log is refused.
                Err(e) => assert_eq!(i, 15, "byte {i}: {e}"),
                // The name: not a log; moved aside, a fresh one started.
                Ok((_, l)) if i < 15 => {
                    let (at, len, why) = l.cut.expect("reported");
                    assert_eq!((at, len, l.rows.len()), (0, whole.len() as u64, 0));
                    assert!(why.contains("moved to"), "{why}");
                    assert_eq!(std::fs::read(&p).unwrap(), MAGIC);
                }
                Ok((mut log, l)) => {
                    assert!(i >= 16, "byte {i} of the magic was accepted");
                    let (at, _, _) = l.cut.expect("the damage is reported");
                    let k = starts.iter().rposition(|&s| s <= i).unwrap();
                    assert_eq!(at, starts[k] as u64, "byte {i}");
                    assert_eq!((l.rows.len(), l.watermark), before[k], "byte {i}");
                    assert_eq!(std::fs::metadata(&p).unwrap().len(), at);
                    log.append(std::iter::empty(), std::iter::empty(), 9)
                        .unwrap();
                    drop(log);
                    let (_, l) = open(&p);
                    assert!(l.cut.is_none());
                    assert_eq!(l.watermark, 9);
                }
            }
        }
        // Cut short at every length: whole frames kept, the rest cut.
        for n in 16..whole.len() {
            std::fs::write(&p, &whole[..n]).unwrap();
            let (_, l) = open(&p);
            let k = starts.iter().rposition(|&s| s <= n).unwrap();
            assert_eq!((l.rows.len(), l.watermark), before[k], "length {n}");
        }
    }

    #[test]
    fn an_empty_or_foreign_file_is_moved_aside_not_a_failed_start() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        for junk in [&b""[..], b"sluice", b"{\"json\": true}\n and more"] {
            std::fs::write(&p, junk).unwrap();
            let (_, l) = open(&p);
            assert_eq!(l.cut.as_ref().map(|c| c.1), Some(junk.len() as u64));
            assert!(l.created);
        }
        let moved = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".damaged-")
            })
            .count();
        assert!(moved >= 1);
    }

    #[test]
    fn a_length_past_the_limit_is_damage_not_an_allocation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        std::fs::write(&p, &f).unwrap();
        let (_, l) = open(&p);
        assert!(l.cut.unwrap().2.contains("length"));
    }

    #[test]
    fn an_unfinished_rewrite_is_removed_and_the_old_log_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        let (mut log, _) = open(&p);
        put(&mut log, b"a", 1, b"A", 1);
        drop(log);
        std::fs::write(tmp_path(&p), b"torn").unwrap();
        let (_, l) = open(&p);
        assert_eq!(l.rows.len(), 1);
        assert!(!tmp_path(&p).exists());
    }
}
