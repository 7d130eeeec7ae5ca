//! Which partition a record goes to, chosen by sluice, never by librdkafka.
//!
//! The consumer rule deduplicates per (instance, partition). It only works
//! if a record produced again (after a kill, a retry, a redrive) lands on the
//! same partition as its first copy. librdkafka's default partitioner
//! (`consistent_random`) picks a *random* partition for a null or empty key
//! on every produce, and any partitioner moves keys when the partition count
//! changes. So the partition is a pure function of the record and of a
//! partition count that replay pins in its own durable state (see
//! [`PartitionMap`] and `offsets.rs`):
//!
//! - a non-empty key: Kafka's murmur2 (`toPositive(murmur2(key)) % n`), so
//!   keyed records land where Java clients and librdkafka's `murmur2`
//!   partitioner put the same key;
//! - no key, or an empty one: a spread derived from `seq` (`seq % n`), the
//!   same on every attempt, even across processes.
//!
//! Records written by a build before this one were partitioned by
//! librdkafka's `consistent_random` (CRC-32 of the key). Replay pins that
//! scheme for every sequence number a previous build may already have
//! produced ([`Scheme::Crc32`]), so an upgrade does not move them.

/// How a key maps to a partition, for one range of sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Kafka's murmur2 for keyed records, `seq % n` for unkeyed ones.
    Murmur2 = 1,
    /// librdkafka's `consistent` partitioner (CRC-32 of the key) for keyed
    /// records, as builds before partition pinning produced them. Unkeyed
    /// records were spread at random then, so no choice can find their first
    /// copy; they take `seq % n` like [`Scheme::Murmur2`].
    Crc32 = 2,
}

impl Scheme {
    pub fn from_byte(b: u8) -> Option<Scheme> {
        match b {
            1 => Some(Scheme::Murmur2),
            2 => Some(Scheme::Crc32),
            _ => None,
        }
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, librdkafka's
/// `rd_murmur2`): MurmurHash2 with seed 0x9747b28c, words read little-endian.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a record with this key and sequence number, in a topic
/// of `partitions` partitions (at least 1; anything lower is treated as 1).
pub fn partition_for(key: Option<&[u8]>, seq: u64, partitions: i32) -> i32 {
    partition_with(Scheme::Murmur2, key, seq, partitions)
}

/// [`partition_for`] under an explicit scheme.
pub fn partition_with(scheme: Scheme, key: Option<&[u8]>, seq: u64, partitions: i32) -> i32 {
    let n = partitions.max(1) as u32;
    let p = match key {
        Some(k) if !k.is_empty() => match scheme {
            Scheme::Murmur2 => (murmur2(k) & 0x7fff_ffff) % n,
            Scheme::Crc32 => crc32fast::hash(k) % n,
        },
        _ => (seq % u64::from(n)) as u32,
    };
    p as i32
}

/// One pinned choice: from `from_seq` on (until the next entry), records of
/// the topic are partitioned over `partitions` with `scheme`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    pub from_seq: u64,
    pub partitions: i32,
    pub scheme: Scheme,
}

impl Pin {
    /// `from_seq` (8 bytes big-endian, the sled key's order) is the key;
    /// this is the value: partitions (4 bytes big-endian), scheme (1 byte).
    pub fn encode_value(&self) -> [u8; 5] {
        let p = self.partitions.to_be_bytes();
        [p[0], p[1], p[2], p[3], self.scheme as u8]
    }

    pub fn decode_value(from_seq: u64, v: &[u8]) -> Option<Pin> {
        let [a, b, c, d, s] = <[u8; 5]>::try_from(v).ok()?;
        let partitions = i32::from_be_bytes([a, b, c, d]);
        if partitions < 1 {
            return None;
        }
        Some(Pin {
            from_seq,
            partitions,
            scheme: Scheme::from_byte(s)?,
        })
    }
}

/// A topic's pinned history, in rising `from_seq`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionMap {
    pins: Vec<Pin>,
}

impl PartitionMap {
    pub fn new(mut pins: Vec<Pin>) -> Self {
        pins.sort_by_key(|p| p.from_seq);
        PartitionMap { pins }
    }

    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }

    /// The pin that governs `seq`: the last one starting at or below it.
    pub fn pin_for(&self, seq: u64) -> Option<&Pin> {
        let i = self.pins.partition_point(|p| p.from_seq <= seq);
        i.checked_sub(1).map(|i| &self.pins[i])
    }

    /// The newest pin (what records above everything produced so far use).
    pub fn latest(&self) -> Option<&Pin> {
        self.pins.last()
    }

    pub fn push(&mut self, pin: Pin) {
        self.pins.push(pin);
        self.pins.sort_by_key(|p| p.from_seq);
    }

    /// The partition of a record, or `None` when no pin covers `seq`.
    /// `live` is the topic's partition count now: a pinned partition at or
    /// past it (the topic was recreated smaller) cannot be produced to and
    /// is folded into range (`p % live`); that record's identity moves, which
    /// is unavoidable, and the caller counts it.
    pub fn partition(&self, key: Option<&[u8]>, seq: u64, live: i32) -> Option<(i32, bool)> {
        let pin = self.pin_for(seq)?;
        let p = partition_with(pin.scheme, key, seq, pin.partitions);
        if live >= 1 && p >= live {
            Some((p % live, true))
        } else {
            Some((p, false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Java client's results, as librdkafka's unit test lists them
    /// (rdmurmur2.c, `java_murmur2_results`).
    #[test]
    fn murmur2_matches_the_java_client() {
        let unaligned = "PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: &[(&str, u32)] = &[
            ("kafka", 0xd067cf64),
            ("giberish123456789", 0x8f552b0c),
            ("1234", 0x9fc97b14),
            ("234", 0xe7c009ca),
            ("34", 0x873930da),
            ("4", 0x5a4b5ca1),
            (unaligned, 0x78424f1c),
            (&unaligned[1..], 0x4a62b377),
            (&unaligned[2..], 0xe0e4e09e),
            (&unaligned[3..], 0x62b8b43f),
            ("", 0x106e08d9),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key.as_bytes()), *want, "murmur2({key:?})");
        }
    }

    #[test]
    fn keyless_and_empty_keys_spread_by_seq_and_never_move() {
        for seq in 0..100u64 {
            let p = partition_for(None, seq, 6);
            assert_eq!(p, (seq % 6) as i32);
            assert_eq!(partition_for(Some(b""), seq, 6), p);
        }
        assert_eq!(partition_for(Some(b"acme"), 1, 0), 0, "a count of 0 is 1");
    }

    #[test]
    fn keyed_records_ignore_seq() {
        let p = partition_for(Some(b"tenant-7"), 1, 12);
        for seq in 0..50 {
            assert_eq!(partition_for(Some(b"tenant-7"), seq, 12), p);
        }
    }

    #[test]
    fn the_pin_in_force_is_the_last_at_or_below_seq() {
        let m = PartitionMap::new(vec![
            Pin {
                from_seq: 101,
                partitions: 6,
                scheme: Scheme::Murmur2,
            },
            Pin {
                from_seq: 1,
                partitions: 3,
                scheme: Scheme::Crc32,
            },
        ]);
        assert_eq!(m.pin_for(0), None);
        assert_eq!(m.pin_for(1).unwrap().partitions, 3);
        assert_eq!(m.pin_for(100).unwrap().partitions, 3);
        assert_eq!(m.pin_for(101).unwrap().partitions, 6);
        assert_eq!(m.partition(None, 100, 6), Some((1, false)));
        assert_eq!(m.partition(None, 101, 6), Some((5, false)));
        // Recreated with 2 partitions: a pinned 2 folds into range.
        assert_eq!(m.partition(None, 5, 2), Some((0, true)));
    }

    #[test]
    fn pin_values_round_trip_and_reject_damage() {
        let pin = Pin {
            from_seq: 9,
            partitions: 48,
            scheme: Scheme::Murmur2,
        };
        assert_eq!(Pin::decode_value(9, &pin.encode_value()), Some(pin));
        assert_eq!(Pin::decode_value(9, &[0, 0, 0, 0, 1]), None);
        assert_eq!(Pin::decode_value(9, &[0, 0, 0, 3, 9]), None);
        assert_eq!(Pin::decode_value(9, &[0, 0, 3]), None);
    }
}
