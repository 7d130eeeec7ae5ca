//! A producer that writes records the way sluice's replay does, and the
//! ledger id of each; shared by the archive tests and the power-cut harness
//! (`tests/powercut.rs`), whose crate root defines `TOPIC`.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::json;

use super::TOPIC;

/// Produces records the way sluice's replay does: `instance` and `seq`
/// headers, first occurrences in increasing `seq` per partition.
pub struct Source {
    producer: BaseProducer,
    instance: String,
    pub next_seq: u64,
    /// Value of every produced seq, to resend as duplicates.
    sent: Vec<(u64, i32, Vec<u8>)>,
}

impl Source {
    pub fn new(brokers: &str, instance: &str) -> Source {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .create()
            .unwrap();
        Source {
            producer,
            instance: instance.into(),
            next_seq: 1,
            sent: Vec::new(),
        }
    }

    pub fn send(&mut self, seq: u64, partition: i32, value: &[u8]) {
        let s = seq.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "instance",
                value: Some(self.instance.as_str()),
            })
            .insert(Header {
                key: "seq",
                value: Some(s.as_str()),
            });
        let mut rec = BaseRecord::<(), [u8]>::to(TOPIC)
            .partition(partition)
            .payload(value)
            .headers(headers);
        loop {
            match self.producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    self.producer.poll(Duration::from_millis(50));
                    rec = r;
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    /// A new record; every 50th is not JSON, the hours are out of order.
    pub fn next(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let value = if seq % 50 == 0 {
            format!("garbage-{}-{seq}", self.instance).into_bytes()
        } else {
            // Hours 10..14 of one day, shuffled: late events throughout.
            let hour = 10 + (seq * 7) % 5;
            let ts = format!(
                "2026-11-26T{hour}:{:02}:{:02}.{:03}Z",
                seq % 60,
                (seq / 60) % 60,
                seq % 1000
            );
            serde_json::to_vec(&json!({
                "id": format!("{}-{seq}", self.instance), "timestamp": ts,
                "tenant_id": format!("t{}", seq % 3), "source": "web", "severity": "INFO",
                "path": format!("/p{}", seq % 7), "userAgent": "curl"}))
            .unwrap()
        };
        let partition = (seq % 3) as i32;
        self.send(seq, partition, &value);
        self.sent.push((seq, partition, value));
        seq
    }

    /// Resends the last `n` records with their own seq: what a sluice
    /// killed after producing, before committing its offset, does.
    pub fn duplicate_tail(&mut self, n: usize) {
        let from = self.sent.len().saturating_sub(n);
        let tail: Vec<_> = self.sent[from..].to_vec();
        for (seq, p, v) in tail {
            self.send(seq, p, &v);
        }
    }

    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }
}

/// The id a recount finds for the record `seq` of `instance`.
pub fn ledger_id(instance: &str, seq: u64) -> String {
    if seq % 50 == 0 {
        format!("garbage-{instance}-{seq}")
    } else {
        format!("{instance}-{seq}")
    }
}
