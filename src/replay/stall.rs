//! Why replay stalled. librdkafka never times a record out here
//! (`message.timeout.ms` is 0, see `producer_config`), so it retries
//! NOT_ENOUGH_REPLICAS, REQUEST_TIMED_OUT and a dead leader's connection
//! forever and tells the application nothing: replay only sees that no
//! delivery report came for `kafka.message-timeout-ms`. Against Apache Kafka
//! with two of three brokers down, that was all `/stats`, `/ready`, the
//! metrics and the log said ("no delivery report for 10000 ms"), while
//! every broker left was reachable. So after a stall replay asks the
//! cluster: each topic's metadata (leaders, replicas, in-sync replicas) and,
//! where the ISR is short, the topic's `min.insync.replicas`
//! (DescribeConfigs). [`judge`] turns the answer into a [`Stall`]; it is
//! shown until a delivery succeeds again.

use std::time::Duration;

/// What the cluster showed when replay stalled, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallCause {
    /// A partition has fewer in-sync replicas than its topic's
    /// `min.insync.replicas`: the leader refuses `acks=all` writes with
    /// NOT_ENOUGH_REPLICAS, which librdkafka retries without end.
    NotEnoughReplicas,
    /// A partition has no leader, or its leader is not among the brokers
    /// the cluster lists (fenced or dead): LEADER_NOT_AVAILABLE.
    NoLeader,
    /// The cluster's metadata could not be read (no broker answered).
    MetadataUnavailable,
    /// The metadata shows nothing wrong: a leader that does not answer
    /// (stopped, overloaded, partitioned away) before the controller fences
    /// it, or a cluster slower than the stall limit.
    NoDeliveryReport,
}

impl StallCause {
    pub const ALL: [StallCause; 4] = [
        StallCause::NotEnoughReplicas,
        StallCause::NoLeader,
        StallCause::MetadataUnavailable,
        StallCause::NoDeliveryReport,
    ];

    /// The `cause` label of `sluice_replay_stalls_total` and
    /// `sluice_replay_stalled`, and `/stats`' `kafka.stall.cause`.
    pub fn label(self) -> &'static str {
        match self {
            StallCause::NotEnoughReplicas => "not_enough_replicas",
            StallCause::NoLeader => "no_leader",
            StallCause::MetadataUnavailable => "metadata_unavailable",
            StallCause::NoDeliveryReport => "no_delivery_report",
        }
    }

    pub fn index(self) -> usize {
        match self {
            StallCause::NotEnoughReplicas => 0,
            StallCause::NoLeader => 1,
            StallCause::MetadataUnavailable => 2,
            StallCause::NoDeliveryReport => 3,
        }
    }
}

/// A stall and what the cluster said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub cause: StallCause,
    /// One line for operators, naming the topic, partitions and numbers.
    pub detail: String,
}

/// One partition as the metadata shows it (broker ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: i32,
    /// -1: none.
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
}

/// One topic's metadata, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicView {
    pub topic: String,
    pub partitions: Result<Vec<PartitionView>, String>,
    /// The topic's `min.insync.replicas`, when it was read.
    pub min_insync: Option<usize>,
}

/// Partitions named in one detail line, at most.
const NAMED: usize = 8;

fn list(parts: &[i32]) -> String {
    let mut s: Vec<String> = parts.iter().take(NAMED).map(i32::to_string).collect();
    if parts.len() > NAMED {
        s.push(format!("and {} more", parts.len() - NAMED));
    }
    s.join(", ")
}

/// The cause of a stall from the topics' metadata and the brokers the
/// cluster lists. A leaderless partition comes first (nothing can be
/// written there at all), then a short ISR, then unreadable metadata.
pub fn judge(topics: &[TopicView], brokers: &[i32]) -> Stall {
    let mut no_leader = Vec::new();
    let mut short = Vec::new();
    let mut unreadable = Vec::new();
    for t in topics {
        let parts = match &t.partitions {
            Ok(p) => p,
            Err(e) => {
                unreadable.push(format!("{}: {e}", t.topic));
                continue;
            }
        };
        let leaderless: Vec<i32> = parts
            .iter()
            .filter(|p| p.leader < 0 || !brokers.contains(&p.leader))
            .map(|p| p.partition)
            .collect();
        if !leaderless.is_empty() {
            no_leader.push(format!(
                "topic {} partition(s) {} without a live leader",
                t.topic,
                list(&leaderless)
            ));
        }
        if let Some(min) = t.min_insync {
            let under: Vec<&PartitionView> = parts.iter().filter(|p| p.isr.len() < min).collect();
            if let Some(first) = under.first() {
                let ids: Vec<i32> = under.iter().map(|p| p.partition).collect();
                short.push(format!(
                    "topic {} partition(s) {}: {} in-sync replica(s) of {} (isr {:?}), below min.insync.replicas {min}",
                    t.topic,
                    list(&ids),
                    first.isr.len(),
                    first.replicas.len(),
                    first.isr,
                ));
            }
        }
    }
    if !no_leader.is_empty() {
        return Stall {
            cause: StallCause::NoLeader,
            detail: format!(
                "LEADER_NOT_AVAILABLE: {} (live brokers {brokers:?})",
                no_leader.join("; ")
            ),
        };
    }
    if !short.is_empty() {
        return Stall {
            cause: StallCause::NotEnoughReplicas,
            detail: format!(
                "NOT_ENOUGH_REPLICAS: {}; the brokers refuse acks=all writes until replicas return",
                short.join("; ")
            ),
        };
    }
    if !unreadable.is_empty() {
        return Stall {
            cause: StallCause::MetadataUnavailable,
            detail: format!("metadata unavailable: {}", unreadable.join("; ")),
        };
    }
    Stall {
        cause: StallCause::NoDeliveryReport,
        detail: format!(
            "the metadata shows every partition led with enough in-sync replicas (live brokers {brokers:?}): a leader that does not answer, or a cluster slower than the stall limit"
        ),
    }
}

/// How long the diagnosis may take in all (metadata, then DescribeConfigs).
pub const DIAGNOSE_WITHIN: Duration = Duration::from_secs(10);

#[cfg(feature = "kafka")]
/// Asks the cluster through a short-lived admin client built from `config`
/// (the producer's, so TLS and SASL apply): metadata of `topics`, then
/// `min.insync.replicas` of those with a short ISR; bounded by `within`.
/// Not through the stalled producer: it must be gone (its queue and
/// in-flight requests purged) before the next producer starts, whatever
/// the diagnosis takes.
pub async fn diagnose(
    config: rdkafka::ClientConfig,
    topics: Vec<String>,
    within: Duration,
) -> Stall {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use std::sync::Arc;

    let admin: Arc<AdminClient<DefaultClientContext>> = match config.create() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            return Stall {
                cause: StallCause::MetadataUnavailable,
                detail: format!("admin client: {e}"),
            }
        }
    };
    let each = within / 2;
    let a = admin.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut brokers = Vec::new();
        let mut views = Vec::new();
        for topic in topics {
            let partitions = match a.inner().fetch_metadata(Some(&topic), each) {
                Err(e) => Err(e.to_string()),
                Ok(md) => {
                    brokers = md.brokers().iter().map(|b| b.id()).collect();
                    match md.topics().iter().find(|t| t.name() == topic) {
                        None => Err("not in the answer".to_string()),
                        Some(t) => match t.error() {
                            Some(e) => {
                                Err(format!("{:?}", rdkafka::types::RDKafkaErrorCode::from(e)))
                            }
                            None => Ok(t
                                .partitions()
                                .iter()
                                .map(|p| PartitionView {
                                    partition: p.id(),
                                    leader: p.leader(),
                                    replicas: p.replicas().to_vec(),
                                    isr: p.isr().to_vec(),
                                })
                                .collect()),
                        },
                    }
                }
            };
            views.push(TopicView {
                topic,
                partitions,
                min_insync: None,
            });
        }
        (views, brokers)
    })
    .await;
    let (mut views, brokers) = match read {
        Ok(v) => v,
        Err(e) => {
            return Stall {
                cause: StallCause::MetadataUnavailable,
                detail: format!("metadata task: {e}"),
            }
        }
    };
    // min.insync.replicas only matters where the ISR is short.
    let short: Vec<String> = views
        .iter()
        .filter(|v| {
            v.partitions
                .as_ref()
                .is_ok_and(|p| p.iter().any(|p| p.isr.len() < p.replicas.len()))
        })
        .map(|v| v.topic.clone())
        .collect();
    if !short.is_empty() {
        let specs: Vec<ResourceSpecifier> =
            short.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(each));
        let answer = tokio::time::timeout(each, admin.describe_configs(&specs, &opts)).await;
        if let Ok(Ok(results)) = answer {
            for (topic, r) in short.iter().zip(results) {
                let min = r.ok().and_then(|c| {
                    c.get("min.insync.replicas")
                        .and_then(|e| e.value.as_deref())
                        .and_then(|v| v.parse().ok())
                });
                if let Some(v) = views.iter_mut().find(|v| &v.topic == topic) {
                    v.min_insync = min;
                }
            }
        }
    }
    // Destroying a client waits for its threads: off the async thread.
    let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
    judge(&views, &brokers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(partition: i32, leader: i32, replicas: &[i32], isr: &[i32]) -> PartitionView {
        PartitionView {
            partition,
            leader,
            replicas: replicas.to_vec(),
            isr: isr.to_vec(),
        }
    }

    fn topic(parts: Vec<PartitionView>, min_insync: Option<usize>) -> TopicView {
        TopicView {
            topic: "events".into(),
            partitions: Ok(parts),
            min_insync,
        }
    }

    /// What Apache Kafka 4.4 showed with brokers 2 and 3 of 3 killed and a
    /// controller-only node keeping the quorum.
    #[test]
    fn one_in_sync_replica_below_min_insync_is_not_enough_replicas() {
        let t = topic(
            vec![
                part(0, 1, &[3, 1, 2], &[1]),
                part(1, 1, &[1, 2, 3], &[1]),
                part(2, 1, &[2, 3, 1], &[1]),
            ],
            Some(2),
        );
        let s = judge(&[t], &[1]);
        assert_eq!(s.cause, StallCause::NotEnoughReplicas);
        assert!(
            s.detail.starts_with(
                "NOT_ENOUGH_REPLICAS: topic events partition(s) 0, 1, 2: 1 in-sync replica(s) of 3"
            ),
            "{}",
            s.detail
        );
        assert!(s.detail.contains("min.insync.replicas 2"), "{}", s.detail);
    }

    #[test]
    fn a_short_isr_at_or_above_min_insync_is_not_the_cause() {
        let t = topic(vec![part(0, 1, &[1, 2, 3], &[1, 2])], Some(2));
        assert_eq!(judge(&[t], &[1, 2]).cause, StallCause::NoDeliveryReport);
        // Unknown min.insync.replicas: no claim about it.
        let t = topic(vec![part(0, 1, &[1, 2, 3], &[1])], None);
        assert_eq!(judge(&[t], &[1]).cause, StallCause::NoDeliveryReport);
    }

    #[test]
    fn a_partition_without_a_live_leader_comes_first() {
        let t = topic(
            vec![part(0, -1, &[1, 2, 3], &[3]), part(1, 3, &[1, 2, 3], &[3])],
            Some(2),
        );
        let s = judge(&[t], &[1, 2]);
        assert_eq!(s.cause, StallCause::NoLeader);
        assert!(
            s.detail.contains("partition(s) 0, 1 without a live leader"),
            "{}",
            s.detail
        );
    }

    #[test]
    fn unreadable_metadata_and_long_lists() {
        let t = TopicView {
            topic: "events".into(),
            partitions: Err("Local: Broker transport failure".into()),
            min_insync: None,
        };
        let s = judge(&[t], &[]);
        assert_eq!(s.cause, StallCause::MetadataUnavailable);
        assert!(s.detail.contains("transport failure"));
        let parts = (0..20).map(|p| part(p, 1, &[1, 2, 3], &[1])).collect();
        let s = judge(&[topic(parts, Some(2))], &[1]);
        assert!(
            s.detail.contains("0, 1, 2, 3, 4, 5, 6, 7, and 12 more"),
            "{}",
            s.detail
        );
    }
}
