//! The byte layout every checkpoint file shares: one header line
//! `<magic> <version> <crc32>\n` (the CRC-32/IEEE of the body, crc32fast,
//! 8 lowercase hex digits) and a JSON body. A file is replaced only by
//! rename, so a body whose CRC does not match is not a torn write: the disk
//! returned other bytes than sluice wrote.
//!
//! Reading is two passes over the file: the CRC over the whole body first
//! (constant memory), so that only a body sluice wrote is ever decoded; then
//! the decoding, streaming (`serde_json::from_reader`), every tracked value
//! cut to 256 bytes as it arrives (`analytics::Counter` deserializes its
//! keys through `cut_keys`). So a file of any size is read with memory
//! bounded by the caps plus the longest single value.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The header's width after the magic: ` <version> <crc32 hex>\n` for a
/// one-digit version.
const HEADER_TAIL: usize = " 0 00000000\n".len();

/// `body` serialized after its header, in one buffer: the header's fixed
/// width reserved, the body written after it, then the header with the
/// body's CRC written over the reservation (no second copy of the body).
pub(super) fn encode<T: Serialize + ?Sized>(
    magic: &str,
    version: u32,
    body: &T,
) -> io::Result<Vec<u8>> {
    debug_assert!(version < 10, "one digit: the header's width is fixed");
    let header_len = magic.len() + HEADER_TAIL;
    let mut bytes = vec![b' '; header_len];
    serde_json::to_writer(&mut bytes, body).map_err(io::Error::other)?;
    let crc = crc32fast::hash(&bytes[header_len..]);
    let header = format!("{magic} {version} {crc:08x}\n");
    debug_assert_eq!(header.len(), header_len);
    bytes[..header_len].copy_from_slice(header.as_bytes());
    Ok(bytes)
}

/// Why a checkpoint file could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    NotFound,
    Io(io::Error),
    /// Damaged: no header, another magic, a bad CRC or a body that is not
    /// the expected JSON.
    Corrupt(String),
    /// A well-formed header of a version this build does not read.
    Version(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::NotFound {
            ReadError::NotFound
        } else {
            ReadError::Io(e)
        }
    }
}

/// A checked file: its version, size and header CRC, and a reader at the
/// start of its body.
pub(super) struct Checked {
    pub version: u32,
    pub len: u64,
    pub crc: u32,
    pub body: BufReader<File>,
}

/// Opens `path` and checks its header (magic, a version among `versions`)
/// and the CRC of its whole body.
pub(super) fn open_checked(
    path: &Path,
    magic: &str,
    versions: &[u32],
) -> Result<Checked, ReadError> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut r = BufReader::new(f);
    let (version, crc, body_at) = read_header(&mut r, magic, versions)?;
    let mut hashing = Crc {
        inner: r,
        hasher: crc32fast::Hasher::new(),
    };
    io::copy(&mut hashing, &mut io::sink())?;
    if hashing.hasher.finalize() != crc {
        return Err(ReadError::Corrupt("checksum mismatch".into()));
    }
    let mut body = hashing.inner;
    body.seek(io::SeekFrom::Start(body_at))?;
    Ok(Checked {
        version,
        len,
        crc,
        body,
    })
}

/// The header CRC of `path`, reading its first line only: tells whether
/// the file was replaced since it was read.
pub(super) fn header_crc(path: &Path, magic: &str, versions: &[u32]) -> Option<u32> {
    let mut r = BufReader::new(File::open(path).ok()?);
    read_header(&mut r, magic, versions)
        .ok()
        .map(|(_, crc, _)| crc)
}

/// Reads the header line (at most 128 bytes of it): the version, the CRC
/// and where the body starts.
fn read_header(
    r: &mut BufReader<File>,
    magic: &str,
    versions: &[u32],
) -> Result<(u32, u32, u64), ReadError> {
    let mut header = Vec::new();
    r.by_ref().take(128).read_until(b'\n', &mut header)?;
    if header.pop() != Some(b'\n') {
        return Err(ReadError::Corrupt("no header line".into()));
    }
    let body_at = header.len() as u64 + 1;
    let text = std::str::from_utf8(&header)
        .map_err(|_| ReadError::Corrupt("header is not UTF-8".into()))?;
    let bad = || ReadError::Corrupt(format!("bad header {text:?}"));
    let rest = text
        .strip_prefix(magic)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(bad)?;
    let (version, crc) = rest.split_once(' ').ok_or_else(bad)?;
    let version: u32 = version.parse().map_err(|_| bad())?;
    let crc = u32::from_str_radix(crc.trim(), 16).map_err(|_| bad())?;
    if !versions.contains(&version) {
        let known: Vec<String> = versions.iter().map(u32::to_string).collect();
        return Err(ReadError::Version(format!(
            "format {version}, written by another sluice version; this build reads format {}",
            known.join(" and ")
        )));
    }
    Ok((version, crc, body_at))
}

/// Decodes a checked body; a body that is not a `T` is corrupt.
pub(super) fn decode<T: DeserializeOwned>(body: BufReader<File>) -> Result<T, ReadError> {
    serde_json::from_reader(body).map_err(|e| {
        if e.is_io() {
            ReadError::Io(io::Error::other(e.to_string()))
        } else {
            ReadError::Corrupt(format!("body: {e}"))
        }
    })
}

/// A reader that hashes what passes through it.
struct Crc<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
