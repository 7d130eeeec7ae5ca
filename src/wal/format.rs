//! The byte layout of segment files. Everything that touches raw bytes on disk
//! lives here, so the format can be read (and fuzzed) in one place.
//!
//! ```text
//! segment file  = header frame*
//! header (24 B) = magic "SLUICEWL" (8) | version u32 LE (4) | first_seq u64 LE (8)
//!                 -- version 2 (this build writes); version 1 still read
//!                 | header_crc u32 LE (4)   -- CRC-32/IEEE over the 20 bytes before it
//! frame         = crc u32 LE (4) | len u32 LE (4) | seq u64 LE (8) | payload (len)
//!                 crc = CRC-32/IEEE (crc32fast, reflected poly 0xEDB88320, init and
//!                 xorout 0xFFFFFFFF) over len ‖ seq ‖ payload, i.e. bytes [4, 16 + len)
//! ```
//!
//! The payload is a record (`record.rs`): in a version-2 segment it starts
//! with the tag 0x02 and names its stream; a version-1 segment holds
//! stream-less records of the default stream. A segment is only ever
//! written by the build that created it (every open starts a new one), so a
//! version-1 segment never holds a version-2 record.
//!
//! All integers are little-endian. `len` is never 0 (an all-zero frame header is
//! how a preallocated or zero-filled tail looks, and it must never parse) and never
//! above [`MAX_PAYLOAD_BYTES`], which is checked before any allocation.

/// First 8 bytes of every segment.
pub const MAGIC: [u8; 8] = *b"SLUICEWL";
/// Format version written in the header. Bumped on any incompatible change:
/// 2 added the stream to every record payload (see `record.rs`).
pub const VERSION: u32 = 2;
/// The oldest version this build still reads: version-1 segments hold
/// records of the default stream.
pub const MIN_READ_VERSION: u32 = 1;
/// Size of the segment header in bytes.
pub const HEADER_LEN: usize = 24;
/// Size of the fixed part of a frame (crc, len, seq).
pub const FRAME_HEADER_LEN: usize = 16;
/// Hard format limit on one payload. Configured event limits sit far below it;
/// this bound exists so that a corrupt length can never make us allocate more.
pub const MAX_PAYLOAD_BYTES: u32 = 64 * 1024 * 1024;
/// Suffix of a sealed or active segment file.
pub const SEGMENT_SUFFIX: &str = ".wal";
/// Suffix of a segment being created; never valid after a restart.
pub const TMP_SUFFIX: &str = ".wal.tmp";
/// Width of the zero-padded sequence number in a segment name, so that
/// lexical order is numeric order.
pub const NAME_DIGITS: usize = 20;

/// The parsed segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u32,
    pub first_seq: u64,
}

/// Why a header did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file shorter than the {HEADER_LEN}-byte header ({0} bytes)")]
    Short(usize),
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 8]),
    #[error("header checksum mismatch")]
    BadCrc,
    #[error("unsupported format version {0} (this build reads {MIN_READ_VERSION} to {VERSION})")]
    Version(u32),
}

pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:0width$}{SEGMENT_SUFFIX}", width = NAME_DIGITS)
}

/// Parses `00000000000000000042.wal` into 42. Anything else is not a segment.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn encode_header(first_seq: u64) -> [u8; HEADER_LEN] {
    encode_header_version(first_seq, VERSION)
}

/// A header of another `version`: for tests and the fuzzer, which must
/// reach the version-1 read path; the writer only writes [`VERSION`].
pub fn encode_header_version(first_seq: u64, version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..20].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

pub fn decode_header(buf: &[u8]) -> Result<SegmentHeader, HeaderError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Err(HeaderError::Short(buf.len()));
    };
    let magic: [u8; 8] = h[0..8].try_into().expect("8-byte slice");
    if magic != MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    if crc32fast::hash(&h[0..20]) != le_u32(&h[20..24]) {
        return Err(HeaderError::BadCrc);
    }
    let version = le_u32(&h[8..12]);
    if !(MIN_READ_VERSION..=VERSION).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    Ok(SegmentHeader {
        version,
        first_seq: le_u64(&h[12..20]),
    })
}

/// Appends one frame for `payload` at `seq` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    debug_assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD_BYTES as usize);
    let len = payload.len() as u32;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

pub fn frame_len(payload_len: usize) -> usize {
    FRAME_HEADER_LEN + payload_len
}

/// One frame as found in a buffer; `payload` borrows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes this frame occupies on disk.
    pub fn disk_len(&self) -> usize {
        frame_len(self.payload.len())
    }
}

/// Why no frame could be read at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The buffer ends inside the frame. `need` is the full frame size when the
    /// length is known and plausible, else the frame header size.
    #[error("incomplete frame: need {need} bytes, have {have}")]
    Incomplete { need: usize, have: usize },
    /// An all-zero frame header: a zero-filled or preallocated tail.
    #[error("zeroed frame header")]
    Zeroed,
    #[error("frame length {0} is out of bounds")]
    BadLength(u32),
    #[error("frame checksum mismatch")]
    BadCrc,
}

/// Reads the frame at the start of `buf`. Never allocates and never panics:
/// the length is bounded before the payload is touched.
pub fn decode_frame(buf: &[u8]) -> Result<Frame<'_>, FrameError> {
    let Some(head) = buf.get(..FRAME_HEADER_LEN) else {
        return Err(FrameError::Incomplete {
            need: FRAME_HEADER_LEN,
            have: buf.len(),
        });
    };
    if head.iter().all(|&b| b == 0) {
        return Err(FrameError::Zeroed);
    }
    let crc = le_u32(&head[0..4]);
    let len = le_u32(&head[4..8]);
    if len == 0 || len > MAX_PAYLOAD_BYTES {
        return Err(FrameError::BadLength(len));
    }
    let total = frame_len(len as usize);
    let Some(body) = buf.get(4..total) else {
        return Err(FrameError::Incomplete {
            need: total,
            have: buf.len(),
        });
    };
    if crc32fast::hash(body) != crc {
        return Err(FrameError::BadCrc);
    }
    Ok(Frame {
        seq: le_u64(&head[8..16]),
        payload: &buf[FRAME_HEADER_LEN..total],
    })
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("caller passes 4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("caller passes 8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = encode_header(42);
        assert_eq!(
            decode_header(&h),
            Ok(SegmentHeader {
                version: VERSION,
                first_seq: 42
            })
        );
        let mut bad = h;
        bad[0] ^= 1;
        assert!(matches!(decode_header(&bad), Err(HeaderError::BadMagic(_))));
        let mut bad = h;
        bad[13] ^= 1;
        assert_eq!(decode_header(&bad), Err(HeaderError::BadCrc));
        assert_eq!(decode_header(&h[..10]), Err(HeaderError::Short(10)));
    }

    #[test]
    fn other_version_is_named_in_the_error_and_version_1_still_reads() {
        let with_version = |v: u32| {
            let mut h = encode_header(1);
            h[8..12].copy_from_slice(&v.to_le_bytes());
            let crc = crc32fast::hash(&h[0..20]);
            h[20..24].copy_from_slice(&crc.to_le_bytes());
            h
        };
        assert_eq!(
            decode_header(&with_version(3)),
            Err(HeaderError::Version(3))
        );
        assert_eq!(
            decode_header(&with_version(0)),
            Err(HeaderError::Version(0))
        );
        assert_eq!(
            decode_header(&with_version(1)),
            Ok(SegmentHeader {
                version: 1,
                first_seq: 1
            })
        );
    }

    #[test]
    fn frame_round_trip_and_every_single_bit_flip_is_caught() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 7, b"hello");
        assert_eq!(
            decode_frame(&buf),
            Ok(Frame {
                seq: 7,
                payload: b"hello"
            })
        );
        for bit in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_frame(&b).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn truncated_zeroed_and_oversized_frames() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, b"payload");
        for cut in 0..buf.len() {
            assert!(matches!(
                decode_frame(&buf[..cut]),
                Err(FrameError::Incomplete { .. })
            ));
        }
        assert_eq!(decode_frame(&[0u8; 64]), Err(FrameError::Zeroed));
        let mut huge = vec![1u8; 16];
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_frame(&huge), Err(FrameError::BadLength(u32::MAX)));
    }

    #[test]
    fn names_sort_numerically_and_reject_lookalikes() {
        assert_eq!(segment_name(5), "00000000000000000005.wal");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("5.wal"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.wal"), None);
        assert_eq!(parse_segment_name("00000000000000000005.wal.tmp"), None);
    }
}
