//! The consumer-side rule that makes sluice's output exactly once: for each
//! (instance, partition) keep the highest `seq` seen and drop any record at
//! or below it. Sound because replay guarantees that, per (instance, topic,
//! partition), first occurrences come in strictly increasing `seq`: a record
//! at or below the high-water mark already appeared.
//!
//! Of two headers with one name the last counts ([`Consumed`] keeps the
//! last), as in `sluice archive` and examples/dedupe_consumer.py. A record
//! re-sent by `sluice wal redrive` has the run's own `instance` and `seq`
//! (its first identity in `origin-instance` / `origin-seq`), so it is
//! judged like any other record of that run.

use std::collections::HashMap;

use super::consume::Consumed;

/// Per (instance, partition) high-water marks. A consumer group stores them
/// in its offset commits' metadata (see the README), so they survive
/// rebalances and restarts.
#[derive(Debug, Default)]
pub struct Dedupe {
    high: HashMap<(String, i32), u64>,
    /// Records dropped as repeats.
    pub dropped: u64,
    /// Records without `instance`/`seq` headers (not produced by sluice),
    /// passed through unchanged.
    pub unmarked: u64,
}

impl Dedupe {
    /// True if `c` is the first occurrence of its record.
    pub fn admit(&mut self, c: &Consumed) -> bool {
        let (Some(instance), Some(seq)) = (
            c.header(crate::replay::producer::HEADER_INSTANCE),
            c.header(crate::replay::producer::HEADER_SEQ)
                .and_then(|s| s.parse::<u64>().ok()),
        ) else {
            self.unmarked += 1;
            return true;
        };
        let high = self
            .high
            .entry((instance.to_string(), c.partition))
            .or_insert(0);
        if seq <= *high {
            self.dropped += 1;
            return false;
        }
        *high = seq;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(instance: &str, partition: i32, seq: u64) -> Consumed {
        let mut headers = serde_json::Map::new();
        headers.insert("instance".into(), instance.into());
        headers.insert("seq".into(), seq.to_string().into());
        Consumed {
            partition,
            offset: 0,
            key: None,
            headers,
            timestamp_ms: None,
            value: serde_json::Value::Null,
            raw_value: crate::wal::inspect::value_json(b"null"),
        }
    }

    #[test]
    fn drops_at_or_below_the_high_water_per_instance_and_partition() {
        let mut d = Dedupe::default();
        let kept: Vec<bool> = [
            rec("a", 0, 1),
            rec("a", 0, 3),
            rec("a", 0, 2), // replayed after 3: already seen
            rec("a", 0, 3),
            rec("a", 1, 2), // another partition
            rec("b", 0, 1), // another instance
            rec("a", 0, 4),
        ]
        .iter()
        .map(|c| d.admit(c))
        .collect();
        assert_eq!(kept, [true, true, false, false, true, true, true]);
        assert_eq!(d.dropped, 2);
    }
}
