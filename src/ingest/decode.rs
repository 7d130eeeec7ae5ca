//! Content codings of a request body: every gzip member (RFC 1952 allows
//! several, and streaming compressors write them), every zstd frame, and
//! nothing after the last one.

use std::io::Read;

/// A content coding we decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Zstd,
}

impl Coding {
    /// The codings named by `Content-Encoding` values, all lines joined into
    /// one list in order, names matched case-insensitively; `identity` is no
    /// coding. The error is the 415 message.
    pub fn parse_list<'a>(
        values: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Coding>, String> {
        let mut out = Vec::new();
        for v in values {
            for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                match c.to_ascii_lowercase().as_str() {
                    "gzip" | "x-gzip" => out.push(Coding::Gzip),
                    "zstd" => out.push(Coding::Zstd),
                    "identity" => {}
                    _ => {
                        return Err(format!(
                            "unsupported Content-Encoding {c:?}: use gzip or zstd"
                        ))
                    }
                }
            }
        }
        if out.len() > 2 {
            return Err("more than two content codings".into());
        }
        Ok(out)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The decoded body would exceed the limit (or `charge` refused).
    TooLarge,
    /// Not valid data for the coding, or bytes after its end: the message.
    Invalid(String),
}

/// A reader of the decoded bytes of one coding over `bytes`.
pub fn reader<'a>(
    coding: Coding,
    bytes: &'a [u8],
    limit: u64,
) -> Result<Box<dyn Read + Send + 'a>, DecodeError> {
    reader_capped(coding, bytes, limit, u64::MAX)
}

/// [`reader`], refusing a gzip body of more than `max_members` members.
pub fn reader_capped<'a>(
    coding: Coding,
    bytes: &'a [u8],
    limit: u64,
    max_members: u64,
) -> Result<Box<dyn Read + Send + 'a>, DecodeError> {
    Ok(match coding {
        // Member after member, within a bounded amount of input per read;
        // bytes after the last one fail as a bad header instead of being
        // ignored.
        Coding::Gzip => Box::new(GzMembers::new(bytes, max_members)),
        Coding::Zstd => {
            let bad = |e: std::io::Error| DecodeError::Invalid(format!("zstd: {e}"));
            let mut d = zstd::stream::read::Decoder::new(bytes).map_err(bad)?;
            // A window larger than the body limit is never needed, and the
            // decoder would allocate it up front.
            let log = (64 - limit.max(1).leading_zeros()).clamp(10, 27);
            d.window_log_max(log).map_err(bad)?;
            Box::new(d)
        }
    })
}

/// Reads up to one chunk of decoded bytes into `out`, within `limit` and
/// what `charge` allows; `Ok(false)` at the end.
pub fn read_chunk(
    reader: &mut dyn Read,
    coding: Coding,
    out: &mut Vec<u8>,
    chunk: &mut [u8],
    limit: u64,
    charge: &mut dyn FnMut(usize) -> bool,
) -> Result<bool, DecodeError> {
    let name = match coding {
        Coding::Gzip => "gzip",
        Coding::Zstd => "zstd",
    };
    let n = match reader.read(chunk) {
        // Input consumed, nothing decoded yet: the caller may yield.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
        r => r.map_err(|e| DecodeError::Invalid(format!("body is not valid {name} data: {e}")))?,
    };
    if n == 0 {
        return Ok(false);
    }
    if out.len() as u64 + n as u64 > limit || !charge(n) {
        return Err(DecodeError::TooLarge);
    }
    if out.capacity() - out.len() < n {
        // Double, but never past the limit: a 10 MiB body must not hold a
        // 16 MiB buffer.
        let want = (out.capacity() * 2).max(out.len() + n).max(256 * 1024);
        let want = want.min(usize::try_from(limit).unwrap_or(usize::MAX));
        out.reserve_exact(want - out.len());
    }
    out.extend_from_slice(&chunk[..n]);
    Ok(true)
}

/// Undoes `codings`, the last applied first. The output never exceeds
/// `limit`; `charge(n)` is asked before each `n` more decoded bytes are kept
/// and may refuse (the in-flight budget).
pub fn decode_body(
    mut bytes: Vec<u8>,
    codings: &[Coding],
    limit: u64,
    mut charge: impl FnMut(usize) -> bool,
) -> Result<Vec<u8>, DecodeError> {
    let mut chunk = vec![0u8; CHUNK];
    for &coding in codings.iter().rev() {
        let mut r = reader(coding, &bytes, limit)?;
        let mut out = Vec::new();
        while read_chunk(&mut r, coding, &mut out, &mut chunk, limit, &mut charge)? {}
        drop(r);
        bytes = out;
    }
    Ok(bytes)
}

/// Decoded bytes read at a time.
pub const CHUNK: usize = 64 * 1024;

/// Compressed bytes one [`GzMembers::read`] consumes at most. flate2's
/// decoders loop over input until they produce output, so without this a
/// body of thousands of members that inflate to nothing would hold the
/// thread (a Tokio worker) for seconds in a single `read`.
const GZ_INPUT_PER_READ: usize = 64 * 1024;

/// Every gzip member of a body, one [`flate2::bufread::GzDecoder`] per
/// member over a slice we advance. A read returns `WouldBlock` once it has
/// consumed [`GZ_INPUT_PER_READ`] bytes without output (flate2 keeps its
/// state and resumes), so the caller can yield. An empty member, or more
/// than `max_members`, is refused: neither can carry more events than that,
/// and each costs a decoder.
struct GzMembers<'a> {
    decoder: Option<flate2::bufread::GzDecoder<Budget<'a>>>,
    /// Decoded bytes of the current member.
    member_out: u64,
    /// Members started so far.
    members: u64,
    max_members: u64,
}

impl<'a> GzMembers<'a> {
    fn new(bytes: &'a [u8], max_members: u64) -> Self {
        GzMembers {
            decoder: Some(flate2::bufread::GzDecoder::new(Budget {
                rest: bytes,
                left: GZ_INPUT_PER_READ,
            })),
            member_out: 0,
            members: 1,
            max_members,
        }
    }
}

impl Read for GzMembers<'_> {
    fn read(&mut self, into: &mut [u8]) -> std::io::Result<usize> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        if let Some(d) = &mut self.decoder {
            d.get_mut().left = GZ_INPUT_PER_READ;
        }
        loop {
            let Some(d) = &mut self.decoder else {
                return Ok(0);
            };
            let n = d.read(into)?;
            if n > 0 || into.is_empty() {
                self.member_out += n as u64;
                return Ok(n);
            }
            // The member ended (its CRC and size checked).
            if self.member_out == 0 {
                return Err(invalid(format!(
                    "gzip member {} decodes to nothing (empty members are refused)",
                    self.members
                )));
            }
            let Budget { rest, left } = self.decoder.take().expect("present").into_inner();
            if rest.is_empty() {
                return Ok(0);
            }
            if self.members >= self.max_members {
                return Err(invalid(format!(
                    "more than {} gzip members (at most one per event)",
                    self.max_members
                )));
            }
            // Bytes after a complete member must be another member: say so
            // plainly instead of letting a decoder report junk as a short
            // header ("unexpected end of file").
            if !rest.starts_with(&[0x1f, 0x8b]) {
                return Err(invalid(format!(
                    "{} bytes after gzip member {} are not a gzip member (they do not start with the gzip magic 1f 8b)",
                    rest.len(),
                    self.members
                )));
            }
            self.members += 1;
            self.member_out = 0;
            self.decoder = Some(flate2::bufread::GzDecoder::new(Budget { rest, left }));
        }
    }
}

/// The compressed input: hands out at most `left` more bytes, then
/// `WouldBlock` until [`GzMembers::read`] grants more.
struct Budget<'a> {
    rest: &'a [u8],
    left: usize,
}

impl Read for Budget<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let src = std::io::BufRead::fill_buf(self)?;
        let n = src.len().min(out.len());
        out[..n].copy_from_slice(&src[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for Budget<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.rest.is_empty() {
            return Ok(&[]);
        }
        if self.left == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(&self.rest[..self.rest.len().min(self.left)])
    }

    fn consume(&mut self, n: usize) {
        self.rest = &self.rest[n..];
        self.left -= n;
    }
}

#[cfg(test)]
mod member_tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn decode_all(bytes: &[u8], max_members: u64) -> Result<Vec<u8>, DecodeError> {
        let mut r = reader_capped(Coding::Gzip, bytes, 1 << 30, max_members)?;
        let (mut out, mut chunk) = (Vec::new(), vec![0u8; CHUNK]);
        while read_chunk(
            &mut r,
            Coding::Gzip,
            &mut out,
            &mut chunk,
            1 << 30,
            &mut |_| true,
        )? {}
        Ok(out)
    }

    #[test]
    fn junk_after_a_member_is_named_as_such() {
        let mut body = gz(b"{\"a\":1}");
        body.extend_from_slice(b"junk!");
        let err = decode_all(&body, 10).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Invalid(m) if m.contains("5 bytes after gzip member 1 are not a gzip member")),
            "{err:?}"
        );
    }

    #[test]
    fn members_are_decoded_in_order_and_counted() {
        let mut body = gz(b"a\n");
        body.extend(gz(b"b\n"));
        body.extend(gz(b"c\n"));
        assert_eq!(decode_all(&body, 3).unwrap(), b"a\nb\nc\n");
        let err = decode_all(&body, 2).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Invalid(m) if m.contains("more than 2 gzip members")),
            "{err:?}"
        );
    }

    #[test]
    fn an_empty_member_and_trailing_garbage_are_refused() {
        let mut body = gz(b"a\n");
        body.extend(gz(b""));
        body.extend(gz(b"b\n"));
        let err = decode_all(&body, 100).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Invalid(m) if m.contains("member 2 decodes to nothing")),
            "{err:?}"
        );
        let mut body = gz(b"a\n");
        body.extend(b"garbage");
        assert!(matches!(
            decode_all(&body, 100),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn a_large_member_is_decoded_across_many_bounded_reads() {
        // Incompressible input: each read consumes at most 64 KiB of it.
        let data: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let body = gz(&data);
        let mut r = reader_capped(Coding::Gzip, &body, 1 << 30, 1).unwrap();
        let (mut out, mut chunk, mut calls) = (Vec::new(), vec![0u8; CHUNK], 0);
        while read_chunk(
            &mut r,
            Coding::Gzip,
            &mut out,
            &mut chunk,
            1 << 30,
            &mut |_| true,
        )
        .unwrap()
        {
            calls += 1;
        }
        assert_eq!(out, data);
        assert!(calls >= body.len() / GZ_INPUT_PER_READ, "{calls} reads");
    }
}
