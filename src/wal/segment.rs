//! Sequential, buffered frame reading from one segment file. Recovery, the
//! replay reader and the offline tools all read segments through
//! [`FrameCursor`], so there is one frame-walking code path to fuzz.

use std::io;
use std::ops::RangeInclusive;

use crate::wal::format::{self, Frame, FrameError, SegmentHeader, HEADER_LEN};
use crate::wal::io::WalFile;

/// Read-ahead size. Replay reads large sequential chunks; a frame larger than
/// this grows the buffer to exactly that frame (bounded by the file size).
const READ_CHUNK: usize = 1024 * 1024;

/// What the cursor found at its position.
pub enum Step<'a> {
    Frame {
        offset: u64,
        frame: Frame<'a>,
    },
    /// No valid frame at `offset`. `error` is `None` for a clean end of file.
    End {
        offset: u64,
        error: Option<FrameError>,
    },
}

pub struct FrameCursor {
    file: Box<dyn WalFile>,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_start: u64,
    /// Offset of the next frame.
    pos: u64,
}

impl FrameCursor {
    /// Reads and checks the header, leaving the cursor at the first frame.
    pub fn open(
        file: Box<dyn WalFile>,
    ) -> io::Result<Result<(SegmentHeader, FrameCursor), format::HeaderError>> {
        let mut head = [0u8; HEADER_LEN];
        let n = read_full(file.as_ref(), &mut head, 0)?;
        Ok(format::decode_header(&head[..n]).map(|h| {
            (
                h,
                FrameCursor {
                    file,
                    buf: Vec::new(),
                    buf_start: HEADER_LEN as u64,
                    pos: HEADER_LEN as u64,
                },
            )
        }))
    }

    /// Offset of the next frame to be read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Moves to `offset`, which must be a frame boundary.
    pub fn seek(&mut self, offset: u64) {
        self.pos = offset;
        self.buf.clear();
        self.buf_start = offset;
    }

    /// Searches forward from `from` for the first offset that holds a valid
    /// frame whose sequence number lies in `seqs`, and positions the cursor
    /// there. After damage this tells a torn tail (nothing valid follows)
    /// from a damaged frame with intact records after it. The sequence filter
    /// is checked before any checksum, so garbage costs one header decode per
    /// byte, and a candidate frame is read only if the file holds all of it.
    pub fn resync(&mut self, from: u64, seqs: RangeInclusive<u64>) -> io::Result<Option<u64>> {
        let file_len = self.file.len()?;
        let head_len = format::FRAME_HEADER_LEN;
        let mut window: Vec<u8> = Vec::new();
        let mut window_start = from;
        let mut off = from;
        while off + head_len as u64 <= file_len {
            let rel = (off - window_start) as usize;
            if rel + head_len > window.len() {
                window_start = off;
                let want = (READ_CHUNK as u64).min(file_len - off) as usize;
                window.resize(want, 0);
                let n = read_full(self.file.as_ref(), &mut window, off)?;
                window.truncate(n);
                if n < head_len {
                    return Ok(None);
                }
                continue;
            }
            let head = &window[rel..rel + head_len];
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            if len != 0 && len <= format::MAX_PAYLOAD_BYTES && seqs.contains(&seq) {
                let total = format::frame_len(len as usize);
                if off + total as u64 <= file_len {
                    let valid = if rel + total <= window.len() {
                        format::decode_frame(&window[rel..]).is_ok()
                    } else {
                        let mut frame = vec![0u8; total];
                        read_full(self.file.as_ref(), &mut frame, off)? == total
                            && format::decode_frame(&frame).is_ok()
                    };
                    if valid {
                        self.seek(off);
                        return Ok(Some(seq));
                    }
                }
            }
            off += 1;
        }
        Ok(None)
    }

    /// Reads the frame at the current position and advances past it. On
    /// `End` the position stays put, so a caller can retry once the file grows.
    pub fn next_frame(&mut self) -> io::Result<Step<'_>> {
        let mut need = format::FRAME_HEADER_LEN;
        loop {
            let rel = (self.pos - self.buf_start) as usize;
            let avail = self.buf.len() - rel;
            if avail < need && self.fill(need)? < need {
                let have = self.buf.len() - (self.pos - self.buf_start) as usize;
                let error = (have > 0).then_some(FrameError::Incomplete { need, have });
                return Ok(Step::End {
                    offset: self.pos,
                    error,
                });
            }
            let rel = (self.pos - self.buf_start) as usize;
            // Decode to plain values first so no borrow of `buf` outlives a
            // loop iteration that may refill it.
            match format::decode_frame(&self.buf[rel..]).map(|f| (f.seq, f.payload.len())) {
                Ok((seq, len)) => {
                    let offset = self.pos;
                    self.pos += format::frame_len(len) as u64;
                    let start = rel + format::FRAME_HEADER_LEN;
                    let frame = Frame {
                        seq,
                        payload: &self.buf[start..start + len],
                    };
                    return Ok(Step::Frame { offset, frame });
                }
                Err(FrameError::Incomplete { need: n, .. }) if n > need => need = n,
                Err(error) => {
                    return Ok(Step::End {
                        offset: self.pos,
                        error: Some(error),
                    })
                }
            }
        }
    }

    /// Ensures `need` bytes from `pos` are buffered if the file has them.
    /// Returns how many are buffered. The length is checked against the file
    /// size before the buffer grows, so a corrupt frame length never makes us
    /// allocate more than the file holds.
    fn fill(&mut self, need: usize) -> io::Result<usize> {
        let rel = (self.pos - self.buf_start) as usize;
        self.buf.drain(..rel);
        self.buf_start = self.pos;
        let file_len = self.file.len()?;
        let in_file = file_len.saturating_sub(self.pos) as usize;
        let target = need.max(READ_CHUNK).min(in_file);
        if self.buf.len() < target {
            let old = self.buf.len();
            self.buf.resize(target, 0);
            let n = read_full(
                self.file.as_ref(),
                &mut self.buf[old..],
                self.pos + old as u64,
            )?;
            self.buf.truncate(old + n);
        }
        Ok(self.buf.len())
    }
}

/// Reads until `buf` is full or the file ends.
pub fn read_full(file: &dyn WalFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The result of walking a segment from its first frame to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// Records with contiguous sequence numbers from `header.first_seq`.
    pub records: u64,
    /// Offset just past the last good frame.
    pub valid_len: u64,
    pub file_len: u64,
    /// Why the walk stopped before the end of the file, if it did.
    pub stop: Option<ScanStop>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    Frame(FrameError),
    /// A well-formed frame whose sequence number breaks contiguity.
    Sequence {
        expected: u64,
        found: u64,
    },
}

impl std::fmt::Display for ScanStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanStop::Frame(e) => write!(f, "{e}"),
            ScanStop::Sequence { expected, found } => {
                write!(f, "sequence {found} where {expected} was expected")
            }
        }
    }
}

impl SegmentScan {
    /// The last sequence number in the valid prefix.
    pub fn last_seq(&self) -> Option<u64> {
        (self.records > 0).then(|| self.header.first_seq + self.records - 1)
    }
}

/// Walks a whole segment, checking every checksum and that sequence numbers
/// are contiguous from the header's first sequence number.
pub fn scan(file: Box<dyn WalFile>) -> io::Result<Result<SegmentScan, format::HeaderError>> {
    let file_len = file.len()?;
    let (header, mut cursor) = match FrameCursor::open(file)? {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let mut records = 0u64;
    let stop = loop {
        let expected = header.first_seq + records;
        match cursor.next_frame()? {
            Step::Frame { frame, offset } if frame.seq != expected => {
                let found = frame.seq;
                cursor.seek(offset);
                break Some(ScanStop::Sequence { expected, found });
            }
            Step::Frame { .. } => records += 1,
            Step::End { error, .. } => break error.map(ScanStop::Frame),
        }
    };
    Ok(Ok(SegmentScan {
        header,
        records,
        valid_len: cursor.position(),
        file_len,
        stop,
    }))
}

impl FrameCursor {
    /// A cursor at the first frame (byte 24) of a segment whose header is not
    /// checked: recovery walks a last segment with a damaged header this way.
    pub fn headerless(file: Box<dyn WalFile>) -> FrameCursor {
        FrameCursor {
            file,
            buf: Vec::new(),
            buf_start: HEADER_LEN as u64,
            pos: HEADER_LEN as u64,
        }
    }
}
