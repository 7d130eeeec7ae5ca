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
    Ok(match coding {
        // MultiGzDecoder reads member after member; bytes after the last
        // one fail as a bad header instead of being ignored.
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(bytes)),
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
    let n = reader
        .read(chunk)
        .map_err(|e| DecodeError::Invalid(format!("body is not valid {name} data: {e}")))?;
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
