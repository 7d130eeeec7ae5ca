//! The broker the chaos harness runs against: `CHAOS_BROKER=dev` (default)
//! a `sluice dev-broker` process (librdkafka's mock cluster) that goes down
//! with SIGUSR1 and comes back with SIGUSR2, every third cycle;
//! `CHAOS_BROKER=kafka` (`make chaos BROKER=kafka`) a real Apache Kafka
//! cluster of 3 broker-only nodes and a controller-only one
//! (`support::apache_kafka`), topics at RF 3 with `min.insync.replicas=2`,
//! where every `CHAOS_BROKER_EVERY`-th cycle (default 5) a random broker is
//! killed with SIGKILL mid-load and restarted after the cycle; before the
//! next such kill every replica of `events` is back in sync.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::apache_kafka::Cluster;
use super::{env_or, signal, wait_file, Rng, EXE};

pub enum Broker {
    Dev {
        child: Child,
        addr: String,
    },
    Kafka {
        cluster: Cluster,
        every: u64,
        /// The broker killed in this cycle, restarted after it.
        down: Option<u32>,
        kills: u64,
    },
}

pub fn kind() -> &'static str {
    match std::env::var("CHAOS_BROKER").as_deref() {
        Ok("kafka") => "kafka",
        Ok("dev") | Ok("") | Err(_) => "dev",
        Ok(other) => panic!("CHAOS_BROKER={other:?}: use dev or kafka"),
    }
}

impl Broker {
    pub fn start(root: &Path) -> Broker {
        if kind() == "dev" {
            let child = Command::new(EXE)
                .args(["dev-broker", "--partitions", "16", "--addr-file"])
                .arg(root.join("broker"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let addr = wait_file(&root.join("broker"), Duration::from_secs(30));
            return Broker::Dev { child, addr };
        }
        let t0 = Instant::now();
        let cluster = Cluster::start_layout(3, 1).unwrap_or_else(|| {
            panic!("CHAOS_BROKER=kafka but Apache Kafka cannot run here (make kafka-jars)")
        });
        cluster.create_topic("events", 16, &[("min.insync.replicas", "2")]);
        cluster.create_topic("events-dlq", 1, &[("min.insync.replicas", "2")]);
        eprintln!(
            "chaos: Apache Kafka, 3 brokers + 1 controller, ready in {:.1} s: {}",
            t0.elapsed().as_secs_f64(),
            cluster.bootstrap()
        );
        Broker::Kafka {
            cluster,
            every: env_or("CHAOS_BROKER_EVERY", 5u64).max(1),
            down: None,
            kills: 0,
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Broker::Dev { addr, .. } => addr.clone(),
            Broker::Kafka { cluster, .. } => cluster.bootstrap().to_string(),
        }
    }

    /// Replay's stall limit: against the real cluster longer than its
    /// round trips under this load (2 s), shorter than a failover (the
    /// controller fences a dead broker after 9 s), so the stall path runs.
    pub fn message_timeout_ms(&self, dev: &'static str) -> String {
        match self {
            Broker::Dev { .. } => dev.to_string(),
            Broker::Kafka { .. } => {
                std::env::var("CHAOS_MESSAGE_TIMEOUT_MS").unwrap_or_else(|_| "2000".to_string())
            }
        }
    }

    pub fn outage_cycle(&self, cycle: u64) -> bool {
        match self {
            Broker::Dev { .. } => cycle % 3 == 2,
            Broker::Kafka { every, .. } => cycle % every == every - 1,
        }
    }

    /// Before the cycle's load: for the real cluster, every replica of
    /// `events` in sync again (the last killed broker caught up), so that
    /// one kill never meets another.
    pub fn prepare(&mut self) {
        if let Broker::Kafka { cluster, .. } = self {
            cluster.wait_ready();
            cluster.wait_in_sync("events", Duration::from_secs(300));
        }
    }

    /// Mid-load: the dev broker stops answering; a random Kafka broker is
    /// killed with SIGKILL.
    pub fn down(&mut self, rng: &mut Rng) {
        match self {
            Broker::Dev { child, .. } => signal(child.id(), "USR1"),
            Broker::Kafka {
                cluster,
                down,
                kills,
                ..
            } => {
                let node = cluster.nodes()[rng.range(0, 3) as usize];
                cluster.kill(node);
                *down = Some(node);
                *kills += 1;
            }
        }
    }

    /// After the cycle: the dev broker answers again; the killed Kafka
    /// broker starts again (not waited for: the next cycles run while it
    /// rejoins).
    pub fn up(&mut self) {
        match self {
            Broker::Dev { child, .. } => signal(child.id(), "USR2"),
            Broker::Kafka { cluster, down, .. } => {
                if let Some(node) = down.take() {
                    cluster.restart_no_wait(node);
                }
            }
        }
    }

    /// Brokers killed so far (0 for the dev broker, whose outages are
    /// counted by cycle).
    pub fn kills(&self) -> u64 {
        match self {
            Broker::Dev { .. } => 0,
            Broker::Kafka { kills, .. } => *kills,
        }
    }

    pub fn stop(self) {
        match self {
            Broker::Dev { mut child, .. } => {
                child.kill().unwrap();
                child.wait().unwrap();
            }
            Broker::Kafka { cluster, .. } => drop(cluster),
        }
    }
}
