//! The record stored in a frame payload: exactly what will be produced to Kafka,
//! and the stream (so the topic) it goes to. Encoding it once at ingest means
//! the replayer never re-serializes events.
//!
//! ```text
//! payload v2 = 0x02 | bincode(stream, key, value, headers, timestamp_ms)
//! payload v1 =        bincode(key, value, headers, timestamp_ms)
//! ```
//!
//! A v1 payload (segment format 1) starts with the `Option` tag of its key,
//! 0x00 or 0x01, so the leading byte tells the two apart; a v1 record belongs
//! to the default stream, which is where that build produced everything.

use serde::{Deserialize, Serialize};

/// The stream of every record written before streams existed, and of a
/// configuration that names none.
pub const DEFAULT_STREAM: &str = "default";

/// First byte of a v2 payload.
const V2_TAG: u8 = 2;

/// A Kafka record as accepted at ingest. The WAL sequence number is not part of
/// it; it lives in the frame and is added as a header when producing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The stream the record was accepted on: replay produces it to that
    /// stream's topic.
    pub stream: String,
    /// Partition key (the tenant id by default).
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// The normalized event as compact JSON.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Kafka headers, in order.
    #[serde(with = "header_bytes")]
    pub headers: Vec<(String, Vec<u8>)>,
    /// Event time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// Byte fields go through serde's `bytes` path (`serde_bytes`): one length
/// and one copy, instead of serde's default for `Vec<u8>`, a sequence
/// decoded element by element (13 % of replay CPU when profiled). bincode
/// lays both out the same way (u64 length, then the bytes), so the on-disk
/// format is unchanged; `layout_is_unchanged_by_the_bytes_fast_path` checks
/// it.
mod header_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(h: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(h.iter().map(|(k, v)| (k.as_str(), Bytes::new(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        let raw: Vec<(String, ByteBuf)> = Vec::deserialize(d)?;
        Ok(raw.into_iter().map(|(k, v)| (k, v.into_vec())).collect())
    }
}

fn bincode_config() -> impl bincode::config::Config {
    // Fixed-width little-endian integers keep the layout easy to document and
    // to inspect with a hex dump; the limit bounds what a corrupt length prefix
    // inside a payload can make the decoder allocate.
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ super::format::MAX_PAYLOAD_BYTES as usize }>()
}

/// The layout of a v1 payload, which carried no stream.
#[derive(Deserialize)]
struct RecordV1 {
    #[serde(with = "serde_bytes")]
    key: Option<Vec<u8>>,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    #[serde(with = "header_bytes")]
    headers: Vec<(String, Vec<u8>)>,
    timestamp_ms: i64,
}

impl Record {
    /// The v2 payload (the only one this build writes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![V2_TAG];
        bincode::serde::encode_into_std_write(self, &mut out, bincode_config())
            .expect("encoding a Record into a Vec cannot fail");
        out
    }

    /// The bytes [`Record::encode`] writes for a record with these parts,
    /// without building a `Record` first (and allocating each header name
    /// and value): what ingest calls once per event.
    pub fn encode_parts(
        stream: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp_ms: i64,
    ) -> Vec<u8> {
        /// `Record` by reference: the same fields, in the same order, through
        /// the same serde paths, so bincode writes the same bytes.
        #[derive(Serialize)]
        struct RecordRef<'a> {
            stream: &'a str,
            #[serde(with = "serde_bytes")]
            key: Option<&'a [u8]>,
            #[serde(with = "serde_bytes")]
            value: &'a [u8],
            #[serde(serialize_with = "header_refs")]
            headers: &'a [(&'a str, &'a [u8])],
            timestamp_ms: i64,
        }
        fn header_refs<S: serde::Serializer>(h: &[(&str, &[u8])], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(h.iter().map(|(k, v)| (*k, serde_bytes::Bytes::new(v))))
        }
        let r = RecordRef {
            stream,
            key,
            value,
            headers,
            timestamp_ms,
        };
        let mut out = vec![V2_TAG];
        bincode::serde::encode_into_std_write(&r, &mut out, bincode_config())
            .expect("encoding a record into a Vec cannot fail");
        out
    }

    /// Decodes a v2 payload, or a v1 one as a record of the default stream.
    /// Payloads come from disk, so any bytes must yield an error rather than
    /// a panic or an unbounded allocation.
    pub fn decode(payload: &[u8]) -> Result<Record, bincode::error::DecodeError> {
        match payload.first() {
            Some(&V2_TAG) => exact(&payload[1..]),
            Some(0 | 1) => {
                let v1: RecordV1 = exact(payload)?;
                Ok(Record {
                    stream: DEFAULT_STREAM.to_string(),
                    key: v1.key,
                    value: v1.value,
                    headers: v1.headers,
                    timestamp_ms: v1.timestamp_ms,
                })
            }
            Some(&other) => Err(bincode::error::DecodeError::OtherString(format!(
                "unknown record tag {other}"
            ))),
            None => Err(bincode::error::DecodeError::OtherString(
                "empty payload".into(),
            )),
        }
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Appends the header `name: value` to an encoded payload without decoding
/// it: the bytes that [`Record::decode`], a push onto `headers` and
/// [`Record::encode`] give (a v1 payload comes out as v2, as that round trip
/// makes it), for a fraction of the work: the headers are the last field
/// before the 8-byte timestamp, so the header count is bumped and the new
/// header spliced in front of the timestamp. The payload is walked with
/// every length checked, so bytes `Record::decode` refuses are refused here
/// too (an error, never a panic).
pub fn push_header(
    payload: &mut Vec<u8>,
    name: &str,
    value: &[u8],
) -> Result<(), bincode::error::DecodeError> {
    let (v1, count_at) = match payload.first() {
        Some(&V2_TAG) => {
            let mut at = 1;
            let stream = take_bytes(payload, &mut at)?;
            std::str::from_utf8(stream).map_err(|e| bad(format!("stream name: {e}")))?;
            (false, skip_key_value(payload, at)?)
        }
        Some(0 | 1) => (true, skip_key_value(payload, 0)?),
        Some(&other) => return Err(bad(format!("unknown record tag {other}"))),
        None => return Err(bad("empty payload".into())),
    };
    let count = read_u64(payload, count_at)?;
    let mut at = count_at + 8;
    for _ in 0..count {
        let name = take_bytes(payload, &mut at)?;
        std::str::from_utf8(name).map_err(|e| bad(format!("header name: {e}")))?;
        take_bytes(payload, &mut at)?;
    }
    match payload.len().checked_sub(at) {
        Some(8) => {}
        Some(n) if n > 8 => return Err(bad(format!("{} trailing bytes after record", n - 8))),
        _ => return Err(bad("payload ends inside the timestamp".into())),
    }
    let count = count
        .checked_add(1)
        .ok_or_else(|| bad("header count overflows".into()))?;
    payload[count_at..count_at + 8].copy_from_slice(&count.to_le_bytes());
    let ts: [u8; 8] = payload[at..].try_into().expect("8 bytes, checked above");
    payload.truncate(at);
    payload.reserve(16 + name.len() + value.len() + 8);
    payload.extend_from_slice(&(name.len() as u64).to_le_bytes());
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(&(value.len() as u64).to_le_bytes());
    payload.extend_from_slice(value);
    payload.extend_from_slice(&ts);
    if v1 {
        // v1 records belong to the default stream; v2 writes it in front.
        let mut prefix = Vec::with_capacity(1 + 8 + DEFAULT_STREAM.len());
        prefix.push(V2_TAG);
        prefix.extend_from_slice(&(DEFAULT_STREAM.len() as u64).to_le_bytes());
        prefix.extend_from_slice(DEFAULT_STREAM.as_bytes());
        payload.splice(0..0, prefix);
    }
    Ok(())
}

fn bad(why: String) -> bincode::error::DecodeError {
    bincode::error::DecodeError::OtherString(why)
}

fn read_u64(bytes: &[u8], at: usize) -> Result<u64, bincode::error::DecodeError> {
    bytes
        .get(at..at.saturating_add(8))
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| bad("payload ends inside a length".into()))
}

/// A u64 length and that many bytes at `*at`; moves `*at` past them.
fn take_bytes<'a>(
    bytes: &'a [u8],
    at: &mut usize,
) -> Result<&'a [u8], bincode::error::DecodeError> {
    let len = read_u64(bytes, *at)?;
    let start = *at + 8;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| start.checked_add(l))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad(format!("length {len} runs past the payload")))?;
    *at = end;
    Ok(&bytes[start..end])
}

/// Skips the key (an `Option` tag, then bytes if 1) and the value starting
/// at `at`; returns where the header count starts.
fn skip_key_value(bytes: &[u8], mut at: usize) -> Result<usize, bincode::error::DecodeError> {
    match bytes.get(at) {
        Some(0) => at += 1,
        Some(1) => {
            at += 1;
            take_bytes(bytes, &mut at)?;
        }
        Some(t) => return Err(bad(format!("invalid key tag {t}"))),
        None => return Err(bad("payload ends before the key".into())),
    }
    take_bytes(bytes, &mut at)?;
    Ok(at)
}

/// The payload [`Record::encode_parts`] writes, built in one allocation with
/// the value written in place by `write_value` (which appends it to the
/// buffer it is given): ingest writes an event's normalized JSON straight
/// into its WAL payload instead of into a buffer it then copies. The layout
/// is bincode's with fixed-width integers, which `encode_with_writes_what_encode_writes`
/// checks against [`Record::encode`]: tag, then each length as a u64 before
/// its bytes, the key's `Option` tag as one byte, the header count as a u64,
/// the timestamp as an i64, all little-endian. `value_hint` sizes the buffer.
pub fn encode_with<E>(
    stream: &str,
    key: Option<&[u8]>,
    headers: &[(&str, &[u8])],
    timestamp_ms: i64,
    value_hint: usize,
    write_value: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let fixed = 1
        + 8
        + stream.len()
        + 1
        + key.map_or(0, |k| 8 + k.len())
        + 8
        + 8
        + headers
            .iter()
            .map(|(k, v)| 16 + k.len() + v.len())
            .sum::<usize>()
        + 8;
    let mut out = Vec::with_capacity(fixed + value_hint);
    let put = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    out.push(V2_TAG);
    put(&mut out, stream.as_bytes());
    match key {
        None => out.push(0),
        Some(k) => {
            out.push(1);
            put(&mut out, k);
        }
    }
    let len_at = out.len();
    out.extend_from_slice(&[0; 8]);
    write_value(&mut out)?;
    let value_len = (out.len() - len_at - 8) as u64;
    out[len_at..len_at + 8].copy_from_slice(&value_len.to_le_bytes());
    out.extend_from_slice(&(headers.len() as u64).to_le_bytes());
    for (k, v) in headers {
        put(&mut out, k.as_bytes());
        put(&mut out, v);
    }
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    Ok(out)
}

/// Decodes `bytes` as one `T` with nothing left over.
fn exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode_config())?;
    if used != bytes.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes after record",
            bytes.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v1 layout (segment format 1), as that build wrote it: plain
    /// `Vec<u8>`s and no stream.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct PlainRecord {
        key: Option<Vec<u8>>,
        value: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
        timestamp_ms: i64,
    }

    #[test]
    fn v1_payloads_decode_as_the_default_stream() {
        for key in [None, Some(b"acme".to_vec()), Some(Vec::new())] {
            let plain = PlainRecord {
                key: key.clone(),
                value: "{\"m\":\"é\"}".as_bytes().to_vec(),
                headers: vec![("id".into(), b"x".to_vec()), ("e".into(), Vec::new())],
                timestamp_ms: -5,
            };
            let old = bincode::serde::encode_to_vec(&plain, bincode_config()).unwrap();
            let r = Record::decode(&old).unwrap();
            assert_eq!(r.stream, DEFAULT_STREAM);
            assert_eq!(
                (r.key, r.value, r.headers, r.timestamp_ms),
                (plain.key, plain.value, plain.headers, plain.timestamp_ms)
            );
            let mut longer = old.clone();
            longer.push(0);
            assert!(Record::decode(&longer).is_err(), "trailing bytes in v1");
        }
    }

    #[test]
    fn v2_carries_the_stream_and_unknown_tags_are_refused() {
        let r = Record {
            stream: "logs".into(),
            key: None,
            value: b"{}".to_vec(),
            headers: Vec::new(),
            timestamp_ms: 1,
        };
        let bytes = r.encode();
        assert_eq!(bytes[0], V2_TAG);
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        for tag in [3u8, 0xff] {
            let mut b = bytes.clone();
            b[0] = tag;
            assert!(Record::decode(&b).is_err());
        }
        assert!(Record::decode(&[]).is_err());
    }

    #[test]
    fn encode_parts_writes_what_encode_writes() {
        for key in [None, Some(b"acme".to_vec()), Some(Vec::new())] {
            for headers in [vec![], vec![("id", &b"x"[..]), ("e", &b""[..])]] {
                let r = Record {
                    stream: "logs".into(),
                    key: key.clone(),
                    value: "{\"m\":\"é\"}".as_bytes().to_vec(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_vec()))
                        .collect(),
                    timestamp_ms: -5,
                };
                let parts = Record::encode_parts("logs", key.as_deref(), &r.value, &headers, -5);
                assert_eq!(parts, r.encode());
            }
        }
    }

    /// What `push_header` must equal: the decode, push, encode round trip.
    fn pushed_by_round_trip(payload: &[u8], name: &str, value: &[u8]) -> Vec<u8> {
        let mut r = Record::decode(payload).unwrap();
        r.headers.push((name.to_string(), value.to_vec()));
        r.encode()
    }

    #[test]
    fn push_header_writes_what_decode_push_encode_writes() {
        let value = [7u8; 300];
        for key in [None, Some(b"acme".to_vec()), Some(Vec::new())] {
            for headers in [
                vec![],
                vec![("id".to_string(), b"x".to_vec()), ("e".into(), Vec::new())],
            ] {
                for (name, extra) in [(":sluice.idempotency", &value[..]), ("", &[][..])] {
                    let v2 = Record {
                        stream: "logs".into(),
                        key: key.clone(),
                        value: "{\"m\":\"é\"}".as_bytes().to_vec(),
                        headers: headers.clone(),
                        timestamp_ms: -5,
                    }
                    .encode();
                    let v1 = bincode::serde::encode_to_vec(
                        &PlainRecord {
                            key: key.clone(),
                            value: b"{}".to_vec(),
                            headers: headers.clone(),
                            timestamp_ms: 1_700_000_000_000,
                        },
                        bincode_config(),
                    )
                    .unwrap();
                    for payload in [v2, v1] {
                        let mut stamped = payload.clone();
                        push_header(&mut stamped, name, extra).unwrap();
                        assert_eq!(stamped, pushed_by_round_trip(&payload, name, extra));
                    }
                }
            }
        }
    }

    #[test]
    fn push_header_refuses_what_decode_refuses() {
        let good = Record {
            stream: "s".into(),
            key: Some(b"k".to_vec()),
            value: b"{}".to_vec(),
            headers: vec![("id".into(), b"x".to_vec())],
            timestamp_ms: 3,
        }
        .encode();
        // Every truncation, every extension, and every single-byte change
        // that decode refuses.
        let mut cases: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        cases.push([good.clone(), vec![0]].concat());
        for i in 0..good.len() {
            for b in [0u8, 1, 2, 0x80, 0xff] {
                let mut c = good.clone();
                c[i] = b;
                cases.push(c);
            }
        }
        let mut evil = vec![V2_TAG];
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        cases.push(evil);
        for c in cases {
            let mut stamped = c.clone();
            match Record::decode(&c) {
                Ok(_) => {
                    push_header(&mut stamped, "h", b"v").unwrap();
                    assert_eq!(stamped, pushed_by_round_trip(&c, "h", b"v"));
                }
                Err(_) => assert!(push_header(&mut stamped, "h", b"v").is_err(), "{c:?}"),
            }
        }
    }

    #[test]
    fn encode_with_writes_what_encode_writes() {
        for key in [None, Some(b"acme".to_vec()), Some(Vec::new())] {
            for headers in [vec![], vec![("id", &b"x"[..]), ("e", &b""[..])]] {
                for value in [&b""[..], "{\"m\":\"é\"}".as_bytes(), &[7u8; 300][..]] {
                    let r = Record {
                        stream: "logs".into(),
                        key: key.clone(),
                        value: value.to_vec(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_vec()))
                            .collect(),
                        timestamp_ms: -5,
                    };
                    let with = encode_with::<()>("logs", key.as_deref(), &headers, -5, 0, |out| {
                        out.extend_from_slice(value);
                        Ok(())
                    });
                    assert_eq!(with, Ok(r.encode()));
                }
            }
        }
    }

    #[test]
    fn round_trip_and_trailing_bytes_rejected() {
        let r = Record {
            stream: DEFAULT_STREAM.into(),
            key: Some(b"tenant-a".to_vec()),
            value: br#"{"message":"hi"}"#.to_vec(),
            headers: vec![("id".into(), b"0190".to_vec())],
            timestamp_ms: 1_700_000_000_000,
        };
        let bytes = r.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
        assert_eq!(r.header("id"), Some(&b"0190"[..]));
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        // v1: key = Some, then a u64 length of 2^60.
        let mut evil = vec![1u8];
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(Record::decode(&evil).is_err());
        // v2: a stream name of 2^60 bytes.
        let mut evil = vec![V2_TAG];
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(Record::decode(&evil).is_err());
    }
}
