//! The record stored in a frame payload: exactly what will be produced to Kafka.
//! Encoding it once at ingest means the replayer never re-serializes events.

use serde::{Deserialize, Serialize};

/// A Kafka record as accepted at ingest. The WAL sequence number is not part of
/// it; it lives in the frame and is added as a header when producing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Partition key (the tenant id by default).
    pub key: Option<Vec<u8>>,
    /// The normalized event as compact JSON.
    pub value: Vec<u8>,
    /// Kafka headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Event time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
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
