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

/// Undoes `codings`, the last applied first. The output never exceeds
/// `limit`; `charge(n)` is asked before each `n` more decoded bytes are kept
/// and may refuse (the in-flight budget).
pub fn decode_body(
    mut bytes: Vec<u8>,
    codings: &[Coding],
    limit: u64,
    mut charge: impl FnMut(usize) -> bool,
) -> Result<Vec<u8>, DecodeError> {
    for coding in codings.iter().rev() {
        let (name, mut reader): (&str, Box<dyn Read + '_>) = match coding {
            // MultiGzDecoder reads member after member; bytes after the last
            // one fail as a bad header instead of being ignored.
            Coding::Gzip => (
                "gzip",
                Box::new(flate2::read::MultiGzDecoder::new(&bytes[..])),
            ),
            Coding::Zstd => {
                let bad = |e: std::io::Error| DecodeError::Invalid(format!("zstd: {e}"));
                let mut d = zstd::stream::read::Decoder::new(&bytes[..]).map_err(bad)?;
                // A window larger than the body limit is never needed, and
                // the decoder would allocate it up front.
                let log = (64 - limit.max(1).leading_zeros()).clamp(10, 27);
                d.window_log_max(log).map_err(bad)?;
                ("zstd", Box::new(d))
            }
        };
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = reader
                .read(&mut chunk)
                .map_err(|e| DecodeError::Invalid(format!("body is not valid {name} data: {e}")))?;
            if n == 0 {
                break;
            }
            if out.len() as u64 + n as u64 > limit || !charge(n) {
                return Err(DecodeError::TooLarge);
            }
            out.extend_from_slice(&chunk[..n]);
        }
        drop(reader);
        bytes = out;
    }
    Ok(bytes)
}
