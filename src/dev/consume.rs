//! Reading a topic back, for `sluice consume` and the tests: every partition
//! from the beginning (or the end), without a consumer group.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

/// One consumed record.
#[derive(Debug, Clone, Serialize)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub timestamp_ms: Option<i64>,
    /// The value as JSON when it is JSON, else as a string (for code that
    /// reads fields; not printed).
    #[serde(skip)]
    pub value: serde_json::Value,
    /// What `sluice consume` prints as `value`: the stored bytes verbatim
    /// when they are JSON (never re-serialized), else a JSON string.
    #[serde(rename = "value")]
    pub raw_value: Box<serde_json::value::RawValue>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.as_str()
    }
}

/// Reads `topic` until `max` records were seen, or nothing new arrived for
/// `idle`, calling `each` for every record.
pub fn consume(
    brokers: &str,
    topic: &str,
    from_beginning: bool,
    max: Option<usize>,
    idle: Duration,
    mut each: impl FnMut(Consumed),
) -> Result<usize, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "sluice-consume")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("metadata for {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(format!("topic {topic} has no partitions (does it exist?)"));
    }
    let mut tpl = TopicPartitionList::new();
    let start = if from_beginning {
        Offset::Beginning
    } else {
        Offset::End
    };
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, start)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
    let mut n = 0;
    let mut last = Instant::now();
    while max.is_none_or(|m| n < m) && last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => tracing::debug!(error = %e, "consume"),
            Some(Ok(m)) => {
                last = Instant::now();
                n += 1;
                // Collected into a map: of two headers with one name the
                // LAST wins, which is the one the consumer rule reads (sluice
                // sends its own `seq` and `instance` after the record's).
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let v = h.value.unwrap_or_default();
                                (h.key.to_string(), crate::wal::inspect::header_json(v))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let payload = m.payload().unwrap_or_default();
                let value = serde_json::from_slice(payload).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
                });
                each(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                    value,
                    raw_value: crate::wal::inspect::value_json(payload),
                });
            }
        }
    }
    Ok(n)
}
