//! A real Apache Kafka cluster for a test: KRaft nodes (combined
//! broker+controller JVMs) on loopback, started and driven by
//! `tests/apache-kafka/cluster.py` in a temp state dir, killed on drop.
//!
//! The broker's jars come from a cache outside the clone (`make kafka-jars`).
//! Without them [`Cluster::start`] prints why and returns `None`, so that
//! `make test` passes on a machine that never fetched them; with
//! `SLUICE_REQUIRE_KAFKA=1` their absence fails the test instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// `tests/apache-kafka/cluster.py`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apache-kafka/cluster.py")
}

/// One partition as `cluster.py describe` reports it (node ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub partition: i32,
    /// -1 while the partition has no leader.
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
}

/// What an ACL is about.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    Topic(&'a str),
    /// Several topics in one AclCommand run.
    Topics(&'a [&'a str]),
    Group(&'a str),
    Cluster,
}

/// A running cluster. Dropping it (also while a test panics) kills every
/// node with SIGKILL; a watchdog started with the cluster does the same if
/// the test process dies without dropping it.
pub struct Cluster {
    state: tempfile::TempDir,
    bootstrap: String,
    nodes: Vec<u32>,
}

impl Cluster {
    /// Formats and starts `nodes` nodes (replication factor min(3, n),
    /// min.insync.replicas min(2, n)) and waits until they serve. `None` when
    /// the jars (or java) are missing and `SLUICE_REQUIRE_KAFKA` is not set.
    pub fn start(nodes: u32) -> Option<Cluster> {
        Cluster::start_with(nodes, &[])
    }

    /// `brokers` broker-only nodes (ids 1..=brokers) beside `controllers`
    /// controller-only nodes (ids after them) that hold the KRaft quorum,
    /// so brokers can die while the quorum stays (`cluster.py up
    /// --controllers`). `nodes()` lists the brokers.
    pub fn start_layout(brokers: u32, controllers: u32) -> Option<Cluster> {
        Cluster::start_with(brokers, &["--controllers", &controllers.to_string()])
    }

    /// As [`Cluster::start`], with a SASL_SSL listener for clients on each
    /// node (SCRAM-SHA-256 and -512 over TLS, a CA made at start), KRaft's
    /// StandardAuthorizer denying what no ACL allows, and the SCRAM user
    /// `sluice` (password [`Cluster::password`]). [`Cluster::bootstrap`]
    /// stays the PLAINTEXT listeners, whose principal is the super user.
    pub fn start_sasl(nodes: u32) -> Option<Cluster> {
        Cluster::start_with(nodes, &["--sasl"])
    }

    /// One 3-node [`Cluster::start_sasl`] cluster for every test of this
    /// process that asks: a cluster takes 30-60 s to start on a loaded
    /// machine. Tests on it use their own topics, users and ACLs, and do
    /// not kill nodes. Never dropped: the watchdog takes it down and
    /// deletes its state once the test process exits.
    pub fn shared_sasl() -> Option<&'static Cluster> {
        static SHARED: std::sync::OnceLock<Option<Cluster>> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| Cluster::start_with(3, &["--sasl", "--remove-state"]))
            .as_ref()
    }

    /// `nodes` brokers; `up_args` go to `cluster.py up` (`--controllers N`,
    /// `--sasl`, `--remove-state`: the watchdog also deletes the state dir
    /// when the test process exits, for a cluster never dropped).
    fn start_with(nodes: u32, up_args: &[&str]) -> Option<Cluster> {
        let check = Command::new("python3")
            .arg(script())
            .args(["jars", "--check"])
            .output();
        let missing = match &check {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => Some(format!("python3: {e}")),
        };
        if let Some(why) = missing {
            if std::env::var_os("SLUICE_REQUIRE_KAFKA").is_some_and(|v| v == "1") {
                panic!("SLUICE_REQUIRE_KAFKA=1 but Apache Kafka cannot run: {why}");
            }
            eprintln!(
                "Apache Kafka not available ({why}): test skipped; `make kafka-jars` \
                 fetches the broker (SLUICE_REQUIRE_KAFKA=1 makes this a failure)"
            );
            return None;
        }
        let state = tempfile::Builder::new()
            .prefix("sluice-kafka-")
            .tempdir()
            .unwrap();
        let mut cluster = Cluster {
            state,
            bootstrap: String::new(),
            nodes: (1..=nodes).collect(),
        };
        // From here on, drop takes the nodes down even if `up` fails half way.
        let out = cluster.run(
            &[
                "up",
                "--nodes",
                &nodes.to_string(),
                "--watch-pid",
                &std::process::id().to_string(),
            ]
            .into_iter()
            .chain(up_args.iter().copied())
            .collect::<Vec<_>>(),
        );
        cluster.bootstrap = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(
            !cluster.bootstrap.is_empty(),
            "cluster.py up printed no bootstrap"
        );
        Some(cluster)
    }

    /// `host:port` of every node, comma-separated (what a client is given).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// `host:port` of the nodes neither killed nor stopped.
    pub fn live_bootstrap(&self) -> String {
        self.text(&["bootstrap", "--live"])
    }

    pub fn nodes(&self) -> &[u32] {
        &self.nodes
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// The directory of node `node` (its `server.log`, its data).
    pub fn node_dir(&self, node: u32) -> PathBuf {
        self.state.path().join(format!("node-{node}"))
    }

    /// Creates `name` with `partitions` partitions, the cluster's
    /// replication factor and min.insync.replicas, and `configs` on top.
    pub fn create_topic(&self, name: &str, partitions: u32, configs: &[(&str, &str)]) {
        let parts = partitions.to_string();
        let mut args = vec!["create-topic", name, "--partitions", &parts];
        let kvs: Vec<String> = configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for kv in &kvs {
            args.extend(["--config", kv.as_str()]);
        }
        self.run(&args);
    }

    pub fn describe(&self, topic: &str) -> Vec<PartitionState> {
        let v: serde_json::Value = serde_json::from_str(&self.text(&["describe", topic])).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<i32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() as i32)
                .collect()
        };
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| PartitionState {
                partition: p["partition"].as_i64().unwrap() as i32,
                leader: p["leader"].as_i64().unwrap() as i32,
                replicas: ids(&p["replicas"]),
                isr: ids(&p["isr"]),
            })
            .collect()
    }

    /// Grows `topic` to `count` partitions on the live cluster
    /// (CreatePartitions, as `kafka-topics --alter --partitions`).
    pub fn add_partitions(&self, topic: &str, count: u32) {
        self.run(&["add-partitions", topic, &count.to_string()]);
    }

    /// Every node (controller-only ones too): id, role ("combined",
    /// "broker", "controller") and state ("up", "stopped", "killed",
    /// "dead": it should run but does not).
    pub fn node_states(&self) -> Vec<(u32, String, String)> {
        let v: serde_json::Value = serde_json::from_str(&self.text(&["status"])).unwrap();
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_u64().unwrap() as u32,
                    n["role"].as_str().unwrap_or("combined").to_string(),
                    n["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Brings back every node a test left killed, stopped or dead (SIGCONT
    /// or a restart) and waits until the cluster is ready; nothing when all
    /// run.
    pub fn heal(&self) {
        let mut changed = false;
        for (id, _, state) in self.node_states() {
            match state.as_str() {
                "up" => {}
                "stopped" => {
                    self.cont(id);
                    changed = true;
                }
                _ => {
                    self.run(&["restart", &id.to_string(), "--no-wait"]);
                    changed = true;
                }
            }
        }
        if changed {
            self.wait_ready();
        }
    }

    /// Until every partition of `topic` has a leader and all its replicas
    /// in sync (a restarted broker caught up), or panics after `within`.
    pub fn wait_in_sync(&self, topic: &str, within: Duration) {
        let t0 = Instant::now();
        loop {
            let parts = self.describe(topic);
            if parts
                .iter()
                .all(|p| p.leader > 0 && p.replicas.iter().all(|r| p.isr.contains(r)))
            {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "{topic} not in sync after {within:?}: {parts:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The node id leading `partition` of `topic` (-1: none).
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        self.text(&["leader", topic, &partition.to_string()])
            .parse()
            .unwrap()
    }

    /// SIGKILL node `node`.
    pub fn kill(&self, node: u32) {
        self.run(&["kill", &node.to_string()]);
    }

    /// SIGSTOP node `node`: it freezes with its sockets open.
    pub fn stop(&self, node: u32) {
        self.run(&["stop", &node.to_string()]);
    }

    /// SIGCONT node `node`.
    pub fn cont(&self, node: u32) {
        self.run(&["cont", &node.to_string()]);
    }

    /// kill -9 node `node` if it runs, start it again on its ports and
    /// directory, and wait until the cluster is ready.
    pub fn restart(&self, node: u32) {
        self.run(&["restart", &node.to_string()]);
    }

    /// kill -9 node `node` if it runs, start it again; returns at once (the
    /// node rejoins while the caller goes on; `wait_ready` waits for it).
    pub fn restart_no_wait(&self, node: u32) {
        self.run(&["restart", &node.to_string(), "--no-wait"]);
    }

    /// Until every node that should run serves: brokers registered, every
    /// partition of a probe topic led with a full ISR, acks=all produce.
    pub fn wait_ready(&self) {
        self.run(&["wait-ready"]);
    }

    /// `host:port` of every node's SASL_SSL listener (a `start_sasl` cluster).
    pub fn sasl_bootstrap(&self) -> String {
        self.text(&["bootstrap", "--sasl"])
    }

    /// The librdkafka properties (`[kafka.librdkafka]`) with which SASL user
    /// `user` reaches the SASL_SSL listeners: protocol, SCRAM-SHA-512,
    /// name, password, and the CA file.
    pub fn client_config(&self, user: &str) -> Vec<(String, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&self.text(&["client-config", "--user", user])).unwrap();
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect()
    }

    /// The password of SASL user `user`.
    pub fn password(&self, user: &str) -> String {
        self.client_config(user)
            .into_iter()
            .find(|(k, _)| k == "sasl.password")
            .unwrap()
            .1
    }

    /// The CA file that signed the brokers' certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.state.path().join("tls/ca.pem")
    }

    /// Creates (or changes) SCRAM user `name`.
    pub fn user_add(&self, name: &str, password: &str) {
        self.run(&["user-add", name, password]);
    }

    /// Allows `principal` (`User:NAME`) each of `operations` (`Write`,
    /// `Read`, `Describe`, ...) on `resource`.
    pub fn acl_add(&self, principal: &str, operations: &[&str], resource: Resource) {
        self.acl("add", principal, operations, resource);
    }

    /// Removes the allow ACLs `acl_add` made.
    pub fn acl_remove(&self, principal: &str, operations: &[&str], resource: Resource) {
        self.acl("remove", principal, operations, resource);
    }

    fn acl(&self, action: &str, principal: &str, operations: &[&str], resource: Resource) {
        let mut args = vec!["acl", action, "--principal", principal];
        for op in operations {
            args.extend(["--operation", op]);
        }
        match resource {
            Resource::Topic(t) => args.extend(["--topic", t]),
            Resource::Topics(ts) => {
                for t in ts {
                    args.extend(["--topic", t]);
                }
            }
            Resource::Group(g) => args.extend(["--group", g]),
            Resource::Cluster => args.push("--cluster"),
        }
        self.run(&args);
    }

    /// Deletes topic `name` (Kafka's TopicCommand `--delete`).
    pub fn delete_topic(&self, name: &str) {
        self.run(&["delete-topic", name]);
    }

    /// Up to `max` values of `topic` from the beginning, read by Kafka's own
    /// Java console consumer: as SASL user `user` over SASL_SSL (it needs
    /// Read on the topic and on group `group`), else as the super user.
    /// Stops after `max` or after 15 s without a record.
    pub fn consume_values(
        &self,
        topic: &str,
        max: usize,
        user: Option<(&str, &str)>,
    ) -> Vec<String> {
        let max = max.to_string();
        let mut args = vec!["consume", topic, "--max", &max];
        if let Some((user, group)) = user {
            args.extend(["--user", user, "--group", group]);
        }
        self.text(&args)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn text(&self, args: &[&str]) -> String {
        String::from_utf8(self.run(args).stdout)
            .unwrap()
            .trim()
            .to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("python3")
            .arg(script())
            .arg("--state-dir")
            .arg(self.state.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster.py {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The pids in the state file, for the last resort in drop.
    fn pids(&self) -> Vec<u32> {
        let Ok(text) = std::fs::read_to_string(self.state.path().join("cluster.json")) else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Vec::new();
        };
        v["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg(script())
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("down")
            .output();
        // If cluster.py could not run, signal the JVMs ourselves. A pid that
        // is gone already makes `kill` fail, which is fine; the JVMs are
        // children of cluster.py, never reused by another cluster's nodes
        // while this state file names them.
        for pid in self.pids() {
            if std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.contains("kafka.Kafka") && c.contains(&*self.state.path().to_string_lossy())
            }) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// The test binary's shared cluster: 3 broker-only nodes and a
/// controller-only one, started by the first test that asks (30-60 s on a
/// loaded 2-core machine) and taken down, with its state dir, by the
/// watchdog when the test process exits (a static is never dropped).
static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
/// Tests take the shared cluster in turns: most of them kill or stop
/// brokers.
static TURN: Mutex<()> = Mutex::new(());

/// One test's turn on the shared cluster; derefs to it.
pub struct Turn {
    _turn: MutexGuard<'static, ()>,
    cluster: &'static Cluster,
}

impl std::ops::Deref for Turn {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        self.cluster
    }
}

/// The shared cluster for one test at a time, every node running and the
/// cluster ready (a test that failed half way may have left a broker
/// killed or stopped: it is brought back first). `None` when Apache Kafka
/// cannot run here and `SLUICE_REQUIRE_KAFKA` is not set, as
/// [`Cluster::start`]. Topics stay between tests: each test uses its own.
pub fn shared() -> Option<Turn> {
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let cluster = SHARED
        .get_or_init(|| {
            let t0 = Instant::now();
            let c = Cluster::start_with(3, &["--controllers", "1", "--remove-state"])?;
            eprintln!(
                "shared Apache Kafka cluster (3 brokers + 1 controller) ready in {:.1} s: {}",
                t0.elapsed().as_secs_f64(),
                c.bootstrap()
            );
            Some(c)
        })
        .as_ref()?;
    cluster.heal();
    Some(Turn {
        _turn: turn,
        cluster,
    })
}
