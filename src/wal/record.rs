//! The record stored in a frame payload: exactly what will be produced to Kafka.
//! Encoding it once at ingest means the replayer never re-serializes events.

use serde::{Deserialize, Serialize};

/// A Kafka record as accepted at ingest. The WAL sequence number is not part of
/// it; it lives in the frame and is added as a header when producing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
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

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode_config())
            .expect("encoding a Record into a Vec cannot fail")
    }

    /// The bytes [`Record::encode`] writes for a record with these parts,
    /// without building a `Record` first (and allocating each header name
    /// and value): what ingest calls once per event.
    pub fn encode_parts(
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp_ms: i64,
    ) -> Vec<u8> {
        /// `Record` by reference: the same fields, in the same order, through
        /// the same serde paths, so bincode writes the same bytes.
        #[derive(Serialize)]
        struct RecordRef<'a> {
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
            key,
            value,
            headers,
            timestamp_ms,
        };
        bincode::serde::encode_to_vec(&r, bincode_config())
            .expect("encoding a record into a Vec cannot fail")
    }

    /// Decodes a payload. Payloads come from disk, so any bytes must yield an
    /// error rather than a panic or an unbounded allocation.
    pub fn decode(payload: &[u8]) -> Result<Record, bincode::error::DecodeError> {
        let (record, used) = bincode::serde::decode_from_slice(payload, bincode_config())?;
        if used != payload.len() {
            return Err(bincode::error::DecodeError::OtherString(format!(
                "{} trailing bytes after record",
                payload.len() - used
            )));
        }
        Ok(record)
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout before the `serde_bytes` fast path: plain `Vec<u8>`s.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct PlainRecord {
        key: Option<Vec<u8>>,
        value: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
        timestamp_ms: i64,
    }

    #[test]
    fn layout_is_unchanged_by_the_bytes_fast_path() {
        for key in [None, Some(b"acme".to_vec()), Some(Vec::new())] {
            let r = Record {
                key: key.clone(),
                value: "{\"m\":\"é\"}".as_bytes().to_vec(),
                headers: vec![("id".into(), b"x".to_vec()), ("e".into(), Vec::new())],
                timestamp_ms: -5,
            };
            let plain = PlainRecord {
                key,
                value: r.value.clone(),
                headers: r.headers.clone(),
                timestamp_ms: r.timestamp_ms,
            };
            let old = bincode::serde::encode_to_vec(&plain, bincode_config()).unwrap();
            assert_eq!(r.encode(), old, "same bytes on disk");
            assert_eq!(Record::decode(&old).unwrap(), r, "old frames still decode");
        }
    }

    #[test]
    fn encode_parts_writes_what_encode_writes() {
        for key in [None, Some(b"acme".to_vec()), Some(Vec::new())] {
            for headers in [vec![], vec![("id", &b"x"[..]), ("e", &b""[..])]] {
                let r = Record {
                    key: key.clone(),
                    value: "{\"m\":\"é\"}".as_bytes().to_vec(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_vec()))
                        .collect(),
                    timestamp_ms: -5,
                };
                let parts = Record::encode_parts(key.as_deref(), &r.value, &headers, -5);
                assert_eq!(parts, r.encode());
            }
        }
    }

    #[test]
    fn round_trip_and_trailing_bytes_rejected() {
        let r = Record {
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
        // key = Some, then a u64 length of 2^60.
        let mut evil = vec![1u8];
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(Record::decode(&evil).is_err());
    }
}
