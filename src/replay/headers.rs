//! Which headers leave sluice: the one decision every producer path takes
//! through [`Ours::pairs`] (replay, the dead-letter topic, `sluice wal
//! redrive`, sluice-loadgen's raw producer).
//!
//! - Every header whose name starts with `:sluice.` stays inside sluice (the
//!   idempotency entry carries a client's Idempotency-Key, the body hash, the
//!   key's scope and the stored response).
//! - A header of the record's own with a name sluice sets (`seq`,
//!   `instance`, `origin-instance`, `origin-seq`, and the dead-letter
//!   headers when they are added) is dropped, so each of those appears once.
//!   Consumers still read the last one of a name (ours come after the
//!   record's own), which is the same header.
//! - Then sluice's own, in this order: `seq`, `instance`, `origin-instance`,
//!   `origin-seq`, then the extras (`error`, `original_topic`).
//!
//! [`super::value_fit`] counts exactly these headers, so a record that fits
//! on one path fits on every path.

use super::producer::{HEADER_INSTANCE, HEADER_ORIGIN_INSTANCE, HEADER_ORIGIN_SEQ, HEADER_SEQ};

/// Names sluice sets on every path; a record's own header of one of these
/// names never leaves.
const RESERVED: [&str; 4] = [
    HEADER_SEQ,
    HEADER_INSTANCE,
    HEADER_ORIGIN_INSTANCE,
    HEADER_ORIGIN_SEQ,
];

/// What sluice adds to a record's own headers.
#[derive(Debug, Clone)]
pub struct Ours<'a> {
    seq: String,
    instance: Option<&'a str>,
    origin_instance: Option<&'a str>,
    origin_seq: Option<String>,
    extra: &'a [(&'a str, &'a [u8])],
}

impl<'a> Ours<'a> {
    /// `seq` and, when known, `instance`: what replay sends.
    pub fn new(seq: u64, instance: Option<&'a str>) -> Ours<'a> {
        Ours {
            seq: seq.to_string(),
            instance,
            origin_instance: None,
            origin_seq: None,
            extra: &[],
        }
    }

    /// A re-sent record (`sluice wal redrive`): the instance and seq it was
    /// first sent under, so a consumer can match it with its original.
    pub fn origin(mut self, instance: Option<&'a str>, seq: u64) -> Ours<'a> {
        self.origin_instance = instance;
        self.origin_seq = Some(seq.to_string());
        self
    }

    /// Headers after ours, e.g. the dead-letter topic's `error` and
    /// `original_topic`.
    pub fn extra(mut self, extra: &'a [(&'a str, &'a [u8])]) -> Ours<'a> {
        self.extra = extra;
        self
    }

    /// True if a record's own header `name` leaves sluice with the record.
    pub fn keeps(&self, name: &str) -> bool {
        !crate::idempotency::is_internal_header(name)
            && !RESERVED.contains(&name)
            && !self.extra.iter().any(|(k, _)| *k == name)
    }

    /// Every header the record leaves sluice with, in order.
    pub fn pairs<'b>(
        &'b self,
        own: &'b [(String, Vec<u8>)],
    ) -> impl Iterator<Item = (&'b str, &'b [u8])> + 'b {
        let own = own
            .iter()
            .filter(|(k, _)| self.keeps(k))
            .map(|(k, v)| (k.as_str(), v.as_slice()));
        let ours = [
            Some((HEADER_SEQ, self.seq.as_bytes())),
            self.instance.map(|i| (HEADER_INSTANCE, i.as_bytes())),
            self.origin_instance
                .map(|i| (HEADER_ORIGIN_INSTANCE, i.as_bytes())),
            self.origin_seq
                .as_deref()
                .map(|s| (HEADER_ORIGIN_SEQ, s.as_bytes())),
        ];
        own.chain(ours.into_iter().flatten())
            .chain(self.extra.iter().copied())
    }

    /// [`Ours::pairs`] as librdkafka headers.
    #[cfg(feature = "kafka")]
    pub fn kafka(&self, own: &[(String, Vec<u8>)]) -> rdkafka::message::OwnedHeaders {
        let mut headers =
            rdkafka::message::OwnedHeaders::new_with_capacity(own.len() + 4 + self.extra.len());
        for (key, value) in self.pairs(own) {
            headers = headers.insert(rdkafka::message::Header {
                key,
                value: Some(value),
            });
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names<'a>(it: impl Iterator<Item = (&'a str, &'a [u8])>) -> Vec<String> {
        it.map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
            .collect()
    }

    #[test]
    fn internal_and_reserved_headers_never_leave_and_ours_come_last() {
        let own: Vec<(String, Vec<u8>)> = [
            ("id", "e1"),
            (":sluice.idempotency", "key, hash, scope, response"),
            ("seq", "stale"),
            ("instance", "old"),
            ("origin-seq", "x"),
            ("error", "own error"),
            (":sluice.future", "x"),
            ("tenant", "acme"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let replay = Ours::new(7, Some("inst"));
        assert_eq!(
            names(replay.pairs(&own)),
            [
                "id=e1",
                "error=own error",
                "tenant=acme",
                "seq=7",
                "instance=inst"
            ]
        );
        let extra: [(&str, &[u8]); 1] = [("error", b"too large")];
        let dead_letter = Ours::new(7, None).extra(&extra);
        assert_eq!(
            names(dead_letter.pairs(&own)),
            ["id=e1", "tenant=acme", "seq=7", "error=too large"]
        );
        let redrive = Ours::new(1, Some("run")).origin(Some("inst"), 7);
        assert_eq!(
            names(redrive.pairs(&own)),
            [
                "id=e1",
                "error=own error",
                "tenant=acme",
                "seq=1",
                "instance=run",
                "origin-instance=inst",
                "origin-seq=7"
            ]
        );
    }
}
