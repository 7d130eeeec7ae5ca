#!/usr/bin/env python3
"""A real Apache Kafka cluster on loopback, without Docker (issue 27).

The broker's jars come from Maven Central through Maven (pom.xml beside this
file pins the version) into a cache outside the clone. Each node is a
combined broker+controller (KRaft) JVM on 127.0.0.1 with free ports and its
own directory under a state dir. Python 3 standard library only; usable from
the command line (`make kafka-up`, the Rust test support, other scripts) and
as a module (`tests/independent/run.py`).

    cluster.py jars [--check]            fetch the jars (or only check them)
    cluster.py up [--nodes 3] [--controllers 0] [--topic NAME[:PARTITIONS]] [--watch-pid PID]
                  [--sasl [--user NAME:PASSWORD]...]
    cluster.py status | bootstrap [--live] [--sasl] | down | wait-ready
    cluster.py kill|stop|cont|restart NODE
    cluster.py create-topic NAME [--partitions 3] [--rf R] [--config K=V]
    cluster.py add-partitions TOPIC COUNT  CreatePartitions: grow TOPIC to COUNT
    cluster.py delete-topic NAME
    cluster.py describe TOPIC            partitions as JSON
    cluster.py leader TOPIC [PARTITION]  node id of the partition's leader
    cluster.py client-config [--user NAME] [--toml]   SASL_SSL client settings
    cluster.py user-add NAME PASSWORD    a SCRAM user (both mechanisms)
    cluster.py acl add|remove --principal User:NAME --operation OP...
               (--topic T | --group G | --cluster)
    cluster.py acl list [--principal User:NAME]
    cluster.py consume TOPIC --max N [--user NAME] [--timeout-ms MS]
               values as lines, through Kafka's own (Java) consumer

Every command takes --state-dir (default: $SLUICE_TEST_KAFKA_STATE, else
<repo>/.tools/kafka-cluster, git-ignored). The state file
STATE_DIR/cluster.json holds the bootstrap servers, each node's id, ports,
directory, pid and state ("up", "stopped" by SIGSTOP, "killed"), so that any
process can drive the cluster that another one started.

Layouts: by default every node is a combined broker+controller (a KRaft
voter), so losing two of three nodes also loses the controller quorum
(metadata freezes: no leader election, no ISR change, admin requests time
out). `up --controllers 1` starts the --nodes brokers as broker-only nodes
(ids 1..n) plus dedicated controller-only node(s) (ids n+1..), the
production layout: brokers can die while the quorum stays, so the ISR
shrinks and `min.insync.replicas` is what refuses writes.

Caches: $SLUICE_TEST_KAFKA_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/sluice;
the jars in CACHE/kafka-VERSION/libs, Maven's repository in CACHE/m2
($SLUICE_TEST_MAVEN_REPO overrides it). Broker configuration: replication factor
min(3, n) for new topics and for the offsets, transaction and share-state
topics, min.insync.replicas min(2, n), group.initial.rebalance.delay.ms 0,
auto.create.topics.enable false (sluice never creates topics; whoever starts
the cluster creates them: `up --topic`, `create-topic`).

`up --sasl` adds a SASL_SSL listener for clients on each node (SCRAM-SHA-256
and SCRAM-SHA-512, a certificate for localhost and 127.0.0.1 signed by a CA
made with openssl at start, in STATE_DIR/tls), KRaft's StandardAuthorizer
with allow.everyone.if.no.acl.found=false, and the SCRAM users of `--user`
(default sluice:sluice-secret) written into the storage by `format
--add-scram`, so they exist before the first node serves. Brokers and
controllers talk over loopback PLAINTEXT listeners, whose principal
(User:ANONYMOUS) is the super user; the admin commands here use them too.
A SASL user can do nothing until ACLs allow it (`acl add`).
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
POM = HERE / "pom.xml"
STATE_FILE = "cluster.json"
READY_TOPIC = "__sluice_ready"

# A loaded 2-core machine: JVMs start slowly, elections take seconds.
READY_TIMEOUT = float(os.environ.get("SLUICE_TEST_KAFKA_READY_TIMEOUT", "180"))
TOOL_TIMEOUT = 120.0
# SLUICE_TEST_KAFKA_VERBOSE=1: wait_ready says what it waits for.
VERBOSE = os.environ.get("SLUICE_TEST_KAFKA_VERBOSE") == "1"
NODE_HEAP = os.environ.get("SLUICE_TEST_KAFKA_HEAP", "-Xmx384m -Xms128m").split()
# A controller-only node holds the metadata log alone: a smaller heap.
CONTROLLER_HEAP = os.environ.get("SLUICE_TEST_KAFKA_CONTROLLER_HEAP", "-Xmx256m -Xms64m").split()
NODE_JVM = ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true"]
# Command-line tools: short-lived, so a small heap and a quick start.
TOOL_JVM = ["-Xmx192m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto",
            "-Djava.awt.headless=true"]


# `up --sasl`: the SCRAM mechanisms each user gets credentials for, the
# users made at format time unless `--user` names others, and the host name
# the SASL_SSL listeners advertise (the certificate names it, and localhost).
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
DEFAULT_USERS = {"sluice": "sluice-secret"}
SASL_HOST = "127.0.0.1"
# The super user: brokers and controllers (and this script's admin
# commands) over the loopback PLAINTEXT listeners, which do not authenticate.
SUPER_USER = "User:ANONYMOUS"


class ClusterError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- jars ----------------------------------------------------------------------

def kafka_version():
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not m:
        raise ClusterError(f"no kafka.version in {POM}")
    return m.group(1).strip()


def cache_dir():
    if os.environ.get("SLUICE_TEST_KAFKA_CACHE"):
        return Path(os.environ["SLUICE_TEST_KAFKA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluice"


def libs_dir():
    return cache_dir() / f"kafka-{kafka_version()}" / "libs"


def maven_repo():
    return Path(os.environ.get("SLUICE_TEST_MAVEN_REPO") or cache_dir() / "m2")


def pom_stamp():
    """What the libs were copied for: the pom's text (version, exclusions)."""
    import hashlib
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def jars_present():
    stamp = libs_dir() / ".complete"
    return stamp.is_file() and stamp.read_text().strip() == pom_stamp()


def fetch_jars(quiet=False):
    """Copies the pinned broker's jars into libs_dir() unless they are there.
    The copy goes to a temporary directory renamed into place, so a fetch
    killed half way leaves nothing that looks complete."""
    libs = libs_dir()
    if jars_present():
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise ClusterError("mvn not found: install Maven (Debian: apt-get install maven)")
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="libs.", dir=libs.parent))
    cmd = [mvn, "-q", "-B", "-f", str(POM), f"-Dmaven.repo.local={maven_repo()}",
           f"-Dkafka.libs={tmp}", "dependency:copy-dependencies"]
    if not quiet:
        log(f"fetching Apache Kafka {kafka_version()} into {libs} (Maven repository {maven_repo()})")
    r = subprocess.run(cmd, cwd=libs.parent, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}{r.stderr[-2000:]}")
    (tmp / ".complete").write_text(pom_stamp() + "\n")
    if libs.exists():
        shutil.rmtree(libs)
    tmp.rename(libs)
    return libs


def classpath():
    if not jars_present():
        raise ClusterError(f"no Apache Kafka jars in {libs_dir()}: run `make kafka-jars` "
                           f"(or `{sys.argv[0]} jars`)")
    return str(libs_dir() / "*")


def java():
    j = shutil.which("java")
    if not j:
        raise ClusterError("java not found: Apache Kafka 4 needs Java 17 or later")
    return j


def class_archive():
    """The class-data-sharing archive of the command-line classes, next to
    the jars, per java binary: a tool starts in ~0.9 s instead of ~2.3 s."""
    j = Path(os.path.realpath(java()))
    tag = f"{j}:{j.stat().st_mtime_ns}:{' '.join(TOOL_JVM)}"
    import hashlib
    return libs_dir().parent / f"tools-{hashlib.sha256(tag.encode()).hexdigest()[:12]}.jsa"


def tool_cmd(main_class, args, make_archive=False):
    """The java command line of one of Kafka's command-line classes. With
    `make_archive` and no archive yet, this run writes one (under a name of
    its own, renamed into place by run_tool)."""
    archive = class_archive()
    if archive.is_file():
        cds = [f"-XX:SharedArchiveFile={archive}"]
    elif make_archive:
        cds = [f"-XX:ArchiveClassesAtExit={archive}.{os.getpid()}.tmp"]
    else:
        cds = []
    return [java()] + TOOL_JVM + cds + [
        f"-Dlog4j2.configurationFile={HERE / 'tools-log4j2.properties'}",
        "-cp", classpath(), main_class] + list(args)


def run_tool(main_class, args, timeout=TOOL_TIMEOUT, check=True, make_archive=False):
    """Runs one of Kafka's command-line classes; returns (rc, stdout, stderr)."""
    cmd = tool_cmd(main_class, args, make_archive)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"{main_class} {' '.join(args)}: no answer in {timeout:.0f} s; "
                           f"stderr: {(e.stderr or b'')[-2000:]!r}")
    finally:
        tmp = Path(f"{class_archive()}.{os.getpid()}.tmp")
        if tmp.exists():
            os.replace(tmp, class_archive())
    if check and r.returncode != 0:
        raise ClusterError(f"{main_class} {' '.join(args)} exit {r.returncode}:\n"
                           f"{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return r.returncode, r.stdout, r.stderr


# --- processes -------------------------------------------------------------------

def proc_state(pid):
    """The kernel's state letter of `pid` (R, S, T, ...), None when it is
    gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    state = stat[stat.rindex(")") + 2]
    return None if state in "ZX" else state


def alive(pid):
    return pid is not None and proc_state(pid) is not None


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def default_state_dir():
    return Path(os.environ.get("SLUICE_TEST_KAFKA_STATE") or ROOT / ".tools" / "kafka-cluster")


class Cluster:
    """A cluster described by STATE_DIR/cluster.json. Every method re-reads
    the file, so several processes can drive one cluster in turn."""

    def __init__(self, state_dir=None):
        self.dir = Path(state_dir or default_state_dir()).resolve()
        self.file = self.dir / STATE_FILE
        self._children = {}  # pid -> Popen, for nodes this process started

    # -- state file --
    def load(self):
        try:
            return json.loads(self.file.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {self.dir} (no {STATE_FILE}): run `up` first")

    def save(self, st):
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2) + "\n")
        os.replace(tmp, self.file)

    def exists(self):
        return self.file.is_file()

    def node(self, st, node_id):
        for n in st["nodes"]:
            if n["id"] == int(node_id):
                return n
        raise ClusterError(f"no node {node_id}: nodes are {[n['id'] for n in st['nodes']]}")

    @property
    def state(self):
        return self.load()

    def bootstrap(self, live_only=False, sasl=False):
        """host:port of every node (or of the running ones), comma-separated;
        with `sasl`, of their SASL_SSL listeners."""
        st = self.load()
        nodes = [n for n in brokers(st) if not live_only or n["state"] == "up"]
        if sasl:
            if "sasl" not in st:
                raise ClusterError("this cluster has no SASL_SSL listener (`up --sasl`)")
            return ",".join(f"{SASL_HOST}:{n['sasl_port']}" for n in nodes)
        return ",".join(f"127.0.0.1:{n['port']}" for n in nodes)

    def node_ids(self):
        return [n["id"] for n in self.load()["nodes"]]

    # -- lifecycle --
    def up(self, nodes=3, topics=(), watch_pid=None, wait=True, sasl=False, users=None,
           remove_state=False, controllers=0):
        """Formats and starts a fresh cluster of `nodes` nodes, replacing any
        cluster this state dir held; waits until it is ready. `sasl`: a
        SASL_SSL listener for clients too, the StandardAuthorizer, and the
        SCRAM users `users` ({name: password}; default DEFAULT_USERS). With
        `controllers` > 0 the `nodes` are broker-only and that many
        controller-only nodes hold the quorum (see the module doc); not
        together with `sasl` (not written yet)."""
        if nodes < 1:
            raise ClusterError("at least one node")
        if controllers < 0:
            raise ClusterError("controllers must be 0 (combined nodes) or more")
        classpath()  # the jars are there
        if self.exists():
            self.down()
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        if sasl and controllers:
            raise ClusterError("--sasl with --controllers is not supported")
        total = nodes + controllers
        per_node = 3 if sasl else 2
        ports = free_ports(per_node * total)
        rf, isr = min(3, nodes), min(2, nodes)
        st = {
            "kafka_version": kafka_version(),
            "libs": str(libs_dir()),
            "cluster_id": None,
            "state_dir": str(self.dir),
            "replication_factor": rf,
            "min_insync_replicas": isr,
            "controllers": controllers,
            "nodes": [],
        }
        if sasl:
            users = dict(users or DEFAULT_USERS)
            st["sasl"] = {"mechanisms": list(SCRAM_MECHANISMS), "users": users,
                          **make_tls(self.dir / "tls")}
        # Voters: every node (combined), or the controller-only ones.
        first_voter = nodes if controllers else 0
        voters = ",".join(f"{i + 1}@127.0.0.1:{ports[per_node * i + 1]}"
                          for i in range(first_voter, total))
        for i in range(total):
            nid, port, cport = i + 1, ports[per_node * i], ports[per_node * i + 1]
            role = "combined" if not controllers else ("broker" if i < nodes else "controller")
            d = self.dir / f"node-{nid}"
            (d / "data").mkdir(parents=True)
            props = server_properties(nid, port, cport, voters, d / "data", nodes, role)
            # A controller-only node's `port` is its controller port (what
            # wait_ready checks); it is never in a bootstrap list.
            node = {"id": nid, "port": cport if role == "controller" else port,
                    "controller_port": cport, "role": role,
                    "dir": str(d), "pid": None, "state": "new"}
            if sasl:
                node["sasl_port"] = ports[per_node * i + 2]
                props = sasl_properties(props, port, node["sasl_port"], st["sasl"])
            (d / "server.properties").write_text(props)
            st["nodes"].append(node)
        # One cluster id for all, as `kafka-storage random-uuid` makes it (a
        # UUID in unpadded url-safe base64, never starting with '-'); format
        # the nodes in parallel (a JVM each).
        t0 = time.monotonic()
        st["cluster_id"] = "-"
        while st["cluster_id"].startswith("-"):
            st["cluster_id"] = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        st["bootstrap"] = ",".join(f"127.0.0.1:{n['port']}" for n in brokers(st))
        scram = []
        if sasl:
            st["sasl"]["bootstrap"] = ",".join(f"{SASL_HOST}:{n['sasl_port']}" for n in brokers(st))
            # The credentials go into the bootstrap metadata: they exist
            # before any node serves.
            for name, password in st["sasl"]["users"].items():
                for mech in SCRAM_MECHANISMS:
                    scram += ["--add-scram", f"{mech}=[name={name},password={password}]"]
        self.save(st)
        fmt = [subprocess.Popen(
            tool_cmd("kafka.tools.StorageTool", ["format", "-t", st["cluster_id"],
                                                 "-c", str(Path(n["dir"]) / "server.properties")]
                     + scram),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in st["nodes"]]
        for n, p in zip(st["nodes"], fmt):
            out, _ = p.communicate(timeout=TOOL_TIMEOUT)
            if p.returncode != 0:
                raise ClusterError(f"formatting node {n['id']} failed:\n{out}")
        self.timings = {"format": time.monotonic() - t0}
        for n in st["nodes"]:
            self._start_node(st, n)
        self.save(st)
        if watch_pid:
            self.watch(watch_pid, remove_state)
        if wait:
            t0 = time.monotonic()
            self.wait_ready()
            self.timings["ready"] = time.monotonic() - t0
            t0 = time.monotonic()
            self.create_topics([(name, int(parts or 3)) for name, _, parts in
                                (t.partition(":") for t in topics)])
            self.timings["topics"] = time.monotonic() - t0
        return self

    def _start_node(self, st, n):
        d = Path(n["dir"])
        out = open(d / "stdout.log", "ab")
        heap = CONTROLLER_HEAP if n.get("role") == "controller" else NODE_HEAP
        cmd = [java()] + heap + NODE_JVM + [
            f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={d}",
            "-cp", classpath(), "kafka.Kafka", str(d / "server.properties")]
        # Its own session: a Ctrl-C in the terminal that ran `make kafka-up`
        # does not reach the brokers, and the JVMs outlive this process.
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, cwd=d)
        out.close()
        self._children[p.pid] = p
        n["pid"], n["state"] = p.pid, "up"

    def _reap(self, pid, within=30.0):
        """Waits until `pid` is gone (reaping it when it is our child)."""
        p = self._children.pop(pid, None)
        if p is not None:
            try:
                p.wait(within)
            except subprocess.TimeoutExpired:
                raise ClusterError(f"pid {pid} did not exit within {within:.0f} s")
            return
        t0 = time.monotonic()
        while alive(pid):
            if time.monotonic() - t0 > within:
                raise ClusterError(f"pid {pid} did not exit within {within:.0f} s")
            time.sleep(0.05)

    def _signal(self, n, sig):
        if not alive(n["pid"]):
            raise ClusterError(f"node {n['id']} (pid {n['pid']}) is not running")
        os.kill(n["pid"], sig)

    def kill(self, node_id):
        """SIGKILL: the node dies without a word to the cluster."""
        st = self.load()
        n = self.node(st, node_id)
        if alive(n["pid"]):
            os.kill(n["pid"], signal.SIGKILL)
            self._reap(n["pid"])
        n["state"] = "killed"
        self.save(st)

    def stop(self, node_id):
        """SIGSTOP: the node freezes, its sockets stay open."""
        st = self.load()
        n = self.node(st, node_id)
        self._signal(n, signal.SIGSTOP)
        n["state"] = "stopped"
        self.save(st)

    def cont(self, node_id):
        st = self.load()
        n = self.node(st, node_id)
        self._signal(n, signal.SIGCONT)
        n["state"] = "up"
        self.save(st)

    def restart(self, node_id, wait=True):
        """kill -9 the node if it runs (or is stopped), start it again on its
        ports and directory, and wait until the cluster is ready."""
        st = self.load()
        n = self.node(st, node_id)
        if alive(n["pid"]):
            os.kill(n["pid"], signal.SIGKILL)
            self._reap(n["pid"])
        self._start_node(st, n)
        self.save(st)
        if wait:
            self.wait_ready()

    def down(self):
        """kill -9 every node. The state dir stays (logs); `up` wipes it."""
        st = self.load()
        for n in st["nodes"]:
            if alive(n["pid"]):
                os.kill(n["pid"], signal.SIGKILL)
        for n in st["nodes"]:
            if n["pid"]:
                try:
                    self._reap(n["pid"])
                except ClusterError:
                    pass
            n["state"] = "down"
        self.save(st)

    def watch(self, pid, remove_state=False):
        """Starts a detached watchdog that takes the cluster down when
        process `pid` (a test run) is gone without doing it; with
        `remove_state`, it then deletes the state dir too (for a cluster a
        test process shares between its tests and never drops;
        SLUICE_TEST_KAFKA_KEEP=1 keeps it)."""
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--state-dir",
                          str(self.dir), "_watch", str(pid), self.load()["cluster_id"]]
                         + (["--remove-state"] if remove_state else []),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)

    def status(self):
        st = self.load()
        rows = []
        for n in st["nodes"]:
            state = n["state"]
            if state in ("up", "stopped") and not alive(n["pid"]):
                state = "dead"
            rows.append({"id": n["id"], "port": n["port"], "pid": n["pid"], "state": state,
                         "role": n.get("role", "combined"), "dir": n["dir"]})
        out = {"bootstrap": st["bootstrap"], "kafka_version": st["kafka_version"],
               "replication_factor": st["replication_factor"],
               "min_insync_replicas": st["min_insync_replicas"], "nodes": rows}
        if "sasl" in st:
            out["sasl"] = {k: st["sasl"][k] for k in ("bootstrap", "mechanisms", "users", "ca")}
        return out

    # -- admin (Kafka's own command-line classes) --
    def _admin_bootstrap(self):
        b = self.bootstrap(live_only=True)
        if not b:
            raise ClusterError("no node is up")
        return b

    def create_topic(self, name, partitions=3, rf=None, configs=None):
        """Creates `name` (if it does not exist) with `rf` replicas (default
        the cluster's min(3, n)) and min.insync.replicas min(2, n) unless
        `configs` says otherwise."""
        st = self.load()
        configs = dict(configs or {})
        configs.setdefault("min.insync.replicas", str(st["min_insync_replicas"]))
        args = ["--bootstrap-server", self._admin_bootstrap(), "--create", "--if-not-exists",
                "--topic", name, "--partitions", str(partitions),
                "--replication-factor", str(rf or st["replication_factor"])]
        for k, v in configs.items():
            args += ["--config", f"{k}={v}"]
        run_tool("org.apache.kafka.tools.TopicCommand", args)

    def create_topics(self, specs, configs=None):
        """create_topic for each (name, partitions) in `specs`, two at a time
        (a JVM each)."""
        specs = list(specs)
        while specs:
            batch, specs = specs[:2], specs[2:]
            errors = []

            def one(spec):
                try:
                    self.create_topic(spec[0], spec[1], configs=configs)
                except ClusterError as e:
                    errors.append(e)
            threads = [threading.Thread(target=one, args=(s,)) for s in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]

    def add_partitions(self, topic, count):
        """CreatePartitions on the live cluster: `topic` grows to `count`
        partitions (kafka-topics --alter --partitions)."""
        run_tool("org.apache.kafka.tools.TopicCommand",
                 ["--bootstrap-server", self._admin_bootstrap(), "--alter", "--topic", topic,
                  "--partitions", str(count)])

    def delete_topic(self, name):
        """Deletes `name` (TopicCommand --delete); returns once the
        controller took the deletion."""
        run_tool("org.apache.kafka.tools.TopicCommand",
                 ["--bootstrap-server", self._admin_bootstrap(), "--delete", "--topic", name])

    def describe(self, topic):
        """[{partition, leader, replicas, isr}] of `topic`; leader -1 when it
        has none."""
        # The first describe (admin client, network) writes the class archive.
        _, out, _ = run_tool("org.apache.kafka.tools.TopicCommand",
                             ["--bootstrap-server", self._admin_bootstrap(), "--describe",
                              "--topic", topic], make_archive=True)
        parts = []
        for line in out.splitlines():
            m = re.search(r"Partition:\s*(\d+)\s+Leader:\s*(-?\w+)\s+Replicas:\s*([\d,]*)\s+Isr:\s*([\d,]*)",
                          line)
            if m:
                leader = m.group(2)
                parts.append({
                    "partition": int(m.group(1)),
                    "leader": int(leader) if leader.lstrip("-").isdigit() else -1,
                    "replicas": [int(x) for x in m.group(3).split(",") if x],
                    "isr": [int(x) for x in m.group(4).split(",") if x],
                })
        if not parts:
            raise ClusterError(f"no partitions of {topic} in:\n{out}")
        return sorted(parts, key=lambda p: p["partition"])

    def leader(self, topic, partition=0):
        for p in self.describe(topic):
            if p["partition"] == int(partition):
                return p["leader"]
        raise ClusterError(f"{topic} has no partition {partition}")

    def produce_check(self, topic, count):
        """Sends `count` records with acks=all through Kafka's
        VerifiableProducer; True when every one was acknowledged."""
        rc, out, err = run_tool("org.apache.kafka.tools.VerifiableProducer",
                                ["--bootstrap-server", self._admin_bootstrap(), "--topic", topic,
                                 "--max-messages", str(count), "--acks", "-1"],
                               check=False)
        ok = sum(1 for line in out.splitlines() if '"producer_send_success"' in line)
        return rc == 0 and ok == count, f"{ok} of {count} acknowledged; {err[-1000:]}"

    # -- SASL_SSL clusters (`up --sasl`) --
    def _sasl(self):
        st = self.load()
        if "sasl" not in st:
            raise ClusterError("this cluster has no SASL_SSL listener (`up --sasl`)")
        return st["sasl"]

    def client_config(self, user=None, mechanism="SCRAM-SHA-512"):
        """librdkafka's (and sluice's `[kafka.librdkafka]`) properties for
        SASL user `user` (default: the first) over the SASL_SSL listener."""
        sasl = self._sasl()
        user = user or next(iter(sasl["users"]))
        if user not in sasl["users"]:
            raise ClusterError(f"no SASL user {user}: users are {list(sasl['users'])}")
        return {"security.protocol": "SASL_SSL", "sasl.mechanism": mechanism,
                "sasl.username": user, "sasl.password": sasl["users"][user],
                "ssl.ca.location": sasl["ca"]}

    def java_client_file(self, user, mechanism="SCRAM-SHA-512"):
        """A properties file for Kafka's Java clients as SASL user `user`."""
        c = self.client_config(user, mechanism)
        f = self.dir / "tls" / f"client-{user}-{mechanism.lower()}.properties"
        f.write_text(
            "security.protocol=SASL_SSL\n"
            f"sasl.mechanism={mechanism}\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{user}" password="{c["sasl.password"]}";\n'
            "ssl.truststore.type=PEM\n"
            f"ssl.truststore.location={c['ssl.ca.location']}\n")
        return f

    def user_add(self, name, password):
        """Creates (or changes) SCRAM user `name`, both mechanisms."""
        self._sasl()
        # One mechanism per request: Kafka 4.4 refuses two in one
        # ("A user credential cannot be altered twice in the same request").
        for mech in SCRAM_MECHANISMS:
            run_tool("org.apache.kafka.tools.ConfigCommand",
                     ["--bootstrap-server", self._admin_bootstrap(), "--alter",
                      "--add-config", f"{mech}=[password={password}]",
                      "--entity-type", "users", "--entity-name", name])
        st = self.load()
        st["sasl"]["users"][name] = password
        self.save(st)

    def acl(self, action, principal=None, operations=(), topic=None, group=None, cluster=False,
            prefixed=False):
        """Adds (`add`) or removes (`remove`) an allow ACL of `principal` for
        each of `operations` (Write, Read, Describe, IdempotentWrite, ...) on
        one resource, or lists (`list`) ACLs; through Kafka's AclCommand as
        the super user. `topic` and `group` may be lists (one ACL each).
        Returns AclCommand's output."""
        args = ["--bootstrap-server", self._admin_bootstrap(), f"--{action}"]
        if action in ("add", "remove"):
            if not principal or not operations:
                raise ClusterError(f"acl {action} needs a principal and an operation")
            args += ["--allow-principal", principal]
            for op in operations:
                args += ["--operation", op]
        elif principal:
            args += ["--principal", principal]
        for t in [topic] if isinstance(topic, str) else topic or ():
            args += ["--topic", t]
        for g in [group] if isinstance(group, str) else group or ():
            args += ["--group", g]
        if cluster:
            args += ["--cluster"]
        if prefixed:
            args += ["--resource-pattern-type", "prefixed"]
        if action == "remove":
            args += ["--force"]
        _, out, _ = run_tool("org.apache.kafka.tools.AclCommand", args)
        return out

    def consume(self, topic, max_messages, user=None, group=None, timeout_ms=15000):
        """Up to `max_messages` values of `topic` from the beginning, through
        Kafka's own (Java) console consumer: over the SASL_SSL listener as
        `user` (who needs Read on the topic and on `group`), else over
        PLAINTEXT as the super user."""
        args = ["--topic", topic, "--from-beginning", "--max-messages", str(max_messages),
                "--timeout-ms", str(timeout_ms)]
        if user:
            args += ["--bootstrap-server", self.bootstrap(sasl=True),
                     "--command-config", str(self.java_client_file(user))]
        else:
            args += ["--bootstrap-server", self._admin_bootstrap()]
        if group:
            args += ["--group", group]
        # The consumer exits 0 on --max-messages and on --timeout-ms alike.
        rc, out, err = run_tool("org.apache.kafka.tools.consumer.ConsoleConsumer", args,
                                timeout=TOOL_TIMEOUT + timeout_ms / 1000, check=False)
        if rc != 0:
            raise ClusterError(f"console consumer exit {rc}: {err[-3000:]}")
        return [line for line in out.splitlines() if line.strip()]

    def wait_ready(self, timeout=READY_TIMEOUT):
        """Until every node meant to be up runs and listens, a topic of one
        partition per node with the cluster's replication factor exists
        (which needs that many registered brokers), every partition has a
        leader and every running replica in its ISR, and one record per
        partition is acknowledged with acks=all."""
        t0 = time.monotonic()
        last = "nothing checked yet"

        def left():
            remaining = timeout - (time.monotonic() - t0)
            if remaining <= 0:
                raise ClusterError(f"cluster in {self.dir} not ready in {timeout:.0f} s: {last}")
            return remaining

        created = False
        said = None
        while True:
            if VERBOSE and last != said:
                log(f"[{time.monotonic() - t0:5.1f} s] {last}")
                said = last
            left()
            st = self.load()
            up = [n for n in st["nodes"] if n["state"] == "up"]
            for n in up:
                if not alive(n["pid"]):
                    tail = tail_file(Path(n["dir"]) / "server.log", 30) or tail_file(
                        Path(n["dir"]) / "stdout.log", 30)
                    raise ClusterError(f"node {n['id']} (pid {n['pid']}) died:\n{tail}")
            waiting = [n["id"] for n in up if not listening(n["port"])]
            if waiting:
                last = f"nodes {waiting} not listening yet"
                time.sleep(0.5)
                continue
            try:
                if not created:
                    self.create_topic(READY_TOPIC, len(brokers(st)),
                                      configs={"min.insync.replicas": "1"})
                    created = True
                live = {n["id"] for n in brokers(st) if n["state"] == "up"}
                parts = self.describe(READY_TOPIC)
                lagging = [p for p in parts
                           if p["leader"] not in live or not live & set(p["replicas"]) <= set(p["isr"])]
                if lagging:
                    last = f"{READY_TOPIC} partitions without a live leader or full ISR: {lagging}"
                    time.sleep(1)
                    continue
                ok, what = self.produce_check(READY_TOPIC, len(parts))
                if ok:
                    return
                last = f"produce to {READY_TOPIC}: {what}"
            except ClusterError as e:
                last = str(e)[-1500:]
            time.sleep(1)


def brokers(st):
    """The nodes that serve clients (combined or broker-only), not the
    controller-only ones."""
    return [n for n in st["nodes"] if n.get("role", "combined") != "controller"]


def server_properties(nid, port, cport, voters, data, nodes, role="combined"):
    """`nodes` is the number of brokers (replication factor min(3, nodes)).
    `role`: "combined" (broker+controller), "broker" or "controller"."""
    rf, isr = min(3, nodes), min(2, nodes)
    if role == "combined":
        roles = {
            "process.roles": "broker,controller",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        }
    elif role == "broker":
        roles = {
            "process.roles": "broker",
            "listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        }
    elif role == "controller":
        roles = {
            "process.roles": "controller",
            "listeners": f"CONTROLLER://127.0.0.1:{cport}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT",
        }
    else:
        raise ClusterError(f"unknown node role {role!r}")
    props = {
        "node.id": nid,
        "controller.quorum.voters": voters,
        "controller.listener.names": "CONTROLLER",
        **roles,
        "log.dirs": str(data),
        "num.partitions": 3,
        "default.replication.factor": rf,
        "min.insync.replicas": isr,
        "offsets.topic.replication.factor": rf,
        "offsets.topic.num.partitions": 5,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": isr,
        "transaction.state.log.num.partitions": 5,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": isr,
        "group.initial.rebalance.delay.ms": 0,
        # Topics exist because a test or the user created them (`up --topic`,
        # `create-topic`); a typo in a topic name is an error, not a topic.
        "auto.create.topics.enable": "false",
        # Two cores: few threads per node.
        "num.network.threads": 2,
        "num.io.threads": 2,
        "background.threads": 2,
        "num.replica.fetchers": 1,
        "num.recovery.threads.per.data.dir": 1,
        "log.cleaner.threads": 1,
        "log.retention.hours": 24,
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def make_tls(d):
    """A CA and one broker certificate for localhost and 127.0.0.1 signed by
    it, made with openssl in `d`: ca.pem (what clients trust) and
    broker.pem (PKCS#8 key and certificate, Kafka's PEM keystore). Valid
    from an hour ago (a clock a little behind) for 30 days."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise ClusterError("openssl not found: `up --sasl` makes its certificates with it")
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        r = subprocess.run([openssl, *args], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args)}: {r.stderr[-1500:]}")
    (d / "ca.cnf").write_text(
        "[req]\ndistinguished_name=dn\n[dn]\n"
        "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
        "[broker]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "authorityKeyIdentifier=keyid\n")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-subj", "/CN=sluice test CA", "-days", "30", "-config", "ca.cnf", "-extensions", "ca")
    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key",
        "-out", "broker.csr", "-subj", "/CN=localhost", "-config", "ca.cnf")
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "broker.crt", "-days", "30", "-extfile", "ca.cnf",
        "-extensions", "broker")
    (d / "broker.pem").write_text((d / "broker.key").read_text() + (d / "broker.crt").read_text())
    return {"ca": str(d / "ca.pem"), "keystore": str(d / "broker.pem")}


def sasl_properties(props, port, sasl_port, sasl):
    """`props` (server_properties) with a SASL_SSL listener on `sasl_port`
    and the StandardAuthorizer."""
    lines = [line for line in props.splitlines()
             if not line.startswith(("listeners=", "advertised.listeners=",
                                     "listener.security.protocol.map="))]
    extra = {
        "listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl_port},"
                     f"CONTROLLER://127.0.0.1:{props_port(props, 'CONTROLLER')}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://{SASL_HOST}:{sasl_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
        "sasl.enabled.mechanisms": ",".join(sasl["mechanisms"]),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": sasl["keystore"],
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": SUPER_USER,
    }
    for mech in sasl["mechanisms"]:
        extra[f"listener.name.sasl_ssl.{mech.lower()}.sasl.jaas.config"] = \
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return "\n".join(lines) + "\n" + "".join(f"{k}={v}\n" for k, v in extra.items())


def props_port(props, listener):
    m = re.search(rf"{listener}://[^:,]+:(\d+)", props)
    if not m:
        raise ClusterError(f"no {listener} listener in {props}")
    return int(m.group(1))


def tail_file(path, lines):
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def watch_loop(state_dir, pid, cluster_id, remove_state=False):
    """The watchdog `up --watch-pid` starts: once `pid` is gone, kill -9 the
    nodes of cluster `cluster_id` (not of a newer cluster in the same dir);
    with `remove_state` (`up --remove-state`), delete the state dir then."""
    c = Cluster(state_dir)
    while True:
        time.sleep(1)
        try:
            st = c.load()
        except (ClusterError, ValueError):
            return
        if st.get("cluster_id") != cluster_id:
            return
        if not alive(int(pid)):
            if not all(n["state"] == "down" for n in st["nodes"]):
                c.down()
            if remove_state and os.environ.get("SLUICE_TEST_KAFKA_KEEP") != "1":
                shutil.rmtree(c.dir, ignore_errors=True)
            return
        if all(n["state"] == "down" for n in st["nodes"]) and not remove_state:
            return


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-dir", default=None, help="default: $SLUICE_TEST_KAFKA_STATE or .tools/kafka-cluster")
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jars", help="fetch the broker's jars into the cache (no-op when present)")
    j.add_argument("--check", action="store_true", help="exit 1 if absent; fetch nothing")
    j.add_argument("--quiet", action="store_true")
    u = sub.add_parser("up", help="format and start a fresh cluster; wait until ready")
    u.add_argument("--nodes", type=int, default=3)
    u.add_argument("--controllers", type=int, default=0,
                   help="0: every node is broker+controller; N: --nodes broker-only nodes "
                        "and N controller-only nodes")
    u.add_argument("--topic", action="append", default=[], help="NAME[:PARTITIONS] to create")
    u.add_argument("--watch-pid", type=int, help="take the cluster down when this pid exits")
    u.add_argument("--remove-state", action="store_true",
                   help="with --watch-pid: also delete the state dir when the pid exits "
                        "(SLUICE_TEST_KAFKA_KEEP=1 keeps it)")
    u.add_argument("--no-wait", action="store_true")
    u.add_argument("--sasl", action="store_true",
                   help="a SASL_SSL (SCRAM) listener for clients, ACLs enforced")
    u.add_argument("--user", action="append", default=[],
                   help=f"NAME:PASSWORD, a SCRAM user (with --sasl; default {DEFAULT_USERS})")
    sub.add_parser("down", help="kill -9 every node")
    sub.add_parser("status", help="bootstrap servers and nodes (JSON)")
    b = sub.add_parser("bootstrap", help="print the bootstrap servers")
    b.add_argument("--live", action="store_true", help="only the nodes neither killed nor stopped")
    b.add_argument("--sasl", action="store_true", help="the SASL_SSL listeners")
    sub.add_parser("wait-ready", help="wait until every running node serves")
    for name, what in (("kill", "kill -9 NODE"), ("stop", "SIGSTOP NODE"),
                       ("cont", "SIGCONT NODE"), ("restart", "kill -9 NODE if running, start it, wait ready")):
        p = sub.add_parser(name, help=what)
        p.add_argument("node", type=int)
        if name == "restart":
            p.add_argument("--no-wait", action="store_true")
    t = sub.add_parser("create-topic")
    t.add_argument("name")
    t.add_argument("--partitions", type=int, default=3)
    t.add_argument("--rf", type=int)
    t.add_argument("--config", action="append", default=[], help="K=V topic config")
    g = sub.add_parser("add-partitions", help="grow TOPIC to COUNT partitions (CreatePartitions)")
    g.add_argument("topic")
    g.add_argument("count", type=int)
    dt = sub.add_parser("delete-topic")
    dt.add_argument("name")
    d = sub.add_parser("describe", help="partitions of TOPIC as JSON")
    d.add_argument("topic")
    le = sub.add_parser("leader", help="the node id leading TOPIC's PARTITION")
    le.add_argument("topic")
    le.add_argument("partition", type=int, nargs="?", default=0)
    cc = sub.add_parser("client-config", help="SASL_SSL client properties (JSON, or TOML for sluice)")
    cc.add_argument("--user")
    cc.add_argument("--mechanism", default="SCRAM-SHA-512", choices=SCRAM_MECHANISMS)
    cc.add_argument("--toml", action="store_true", help="as sluice's [kafka] section")
    ua = sub.add_parser("user-add", help="create or change a SCRAM user")
    ua.add_argument("name")
    ua.add_argument("password")
    ac = sub.add_parser("acl", help="add, remove or list allow ACLs")
    ac.add_argument("action", choices=("add", "remove", "list"))
    ac.add_argument("--principal", help="e.g. User:sluice")
    ac.add_argument("--operation", action="append", default=[],
                    help="Write, Read, Describe, IdempotentWrite, All, ...")
    ac.add_argument("--topic", action="append", help="repeat for several")
    ac.add_argument("--group", action="append", help="repeat for several")
    ac.add_argument("--cluster", action="store_true")
    ac.add_argument("--prefixed", action="store_true", help="the name is a prefix")
    co = sub.add_parser("consume", help="values of TOPIC from the beginning (Java console consumer)")
    co.add_argument("topic")
    co.add_argument("--max", type=int, required=True)
    co.add_argument("--user", help="as this SASL user over SASL_SSL (default: super user, PLAINTEXT)")
    co.add_argument("--group")
    co.add_argument("--timeout-ms", type=int, default=15000)
    w = sub.add_parser("_watch")
    w.add_argument("pid", type=int)
    w.add_argument("cluster_id")
    w.add_argument("--remove-state", action="store_true")
    a = ap.parse_args(argv)

    c = Cluster(a.state_dir)
    try:
        if a.cmd == "jars":
            if a.check:
                print(libs_dir())
                if not jars_present():
                    log(f"no Apache Kafka {kafka_version()} jars in {libs_dir()} (make kafka-jars)")
                    return 1
                java()
                return 0
            t0 = time.monotonic()
            had = jars_present()
            fetch_jars(quiet=a.quiet)
            print(libs_dir())
            if not a.quiet and not had:
                log(f"jars fetched in {time.monotonic() - t0:.1f} s")
        elif a.cmd == "up":
            t0 = time.monotonic()
            if a.user and not a.sasl:
                raise ClusterError("--user needs --sasl")
            users = dict(u.split(":", 1) for u in a.user) if a.user else None
            c.up(a.nodes, a.topic, a.watch_pid, wait=not a.no_wait, sasl=a.sasl, users=users,
                 remove_state=a.remove_state, controllers=a.controllers)
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items())
            log(f"{a.nodes} broker(s){f' + {a.controllers} controller(s)' if a.controllers else ''} ready in {time.monotonic() - t0:.1f} s ({phases}); state {c.file}")
            if a.sasl:
                log(f"SASL_SSL (SCRAM) listeners: {c.bootstrap(sasl=True)}; users "
                    f"{list(c.load()['sasl']['users'])}; CA {c.load()['sasl']['ca']}; "
                    f"`client-config --toml` prints sluice's settings")
            print(c.bootstrap())
        elif a.cmd == "down":
            if c.exists():
                c.down()
        elif a.cmd == "status":
            print(json.dumps(c.status(), indent=2))
        elif a.cmd == "bootstrap":
            print(c.bootstrap(live_only=a.live, sasl=a.sasl))
        elif a.cmd == "wait-ready":
            c.wait_ready()
        elif a.cmd == "kill":
            c.kill(a.node)
        elif a.cmd == "stop":
            c.stop(a.node)
        elif a.cmd == "cont":
            c.cont(a.node)
        elif a.cmd == "restart":
            c.restart(a.node, wait=not a.no_wait)
        elif a.cmd == "create-topic":
            c.create_topic(a.name, a.partitions, a.rf, dict(kv.split("=", 1) for kv in a.config))
        elif a.cmd == "add-partitions":
            c.add_partitions(a.topic, a.count)
        elif a.cmd == "delete-topic":
            c.delete_topic(a.name)
        elif a.cmd == "describe":
            print(json.dumps(c.describe(a.topic)))
        elif a.cmd == "leader":
            print(c.leader(a.topic, a.partition))
        elif a.cmd == "client-config":
            conf = c.client_config(a.user, a.mechanism)
            if a.toml:
                print(f'[kafka]\nbrokers = "{c.bootstrap(sasl=True)}"\n[kafka.librdkafka]')
                print("".join(f'"{k}" = "{v}"\n' for k, v in conf.items()), end="")
            else:
                print(json.dumps(conf, indent=2))
        elif a.cmd == "user-add":
            c.user_add(a.name, a.password)
        elif a.cmd == "acl":
            print(c.acl(a.action, a.principal, a.operation, a.topic, a.group, a.cluster,
                        a.prefixed), end="")
        elif a.cmd == "consume":
            for line in c.consume(a.topic, a.max, a.user, a.group, a.timeout_ms):
                print(line)
        elif a.cmd == "_watch":
            watch_loop(c.dir, a.pid, a.cluster_id, a.remove_state)
    except ClusterError as e:
        log(f"cluster.py {a.cmd}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
