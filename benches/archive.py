#!/usr/bin/env python3
"""Archive throughput against sluice's own drain rate, in the same run.

1. A `sluice dev-broker` (3 partitions, one more per 15,000 events past
   45,000: it keeps only the last 5 MiB of each) is taken down (SIGUSR1) while
   `sluice serve` acknowledges N events (NDJSON batches of 1,000), so they
   wait in the WAL.
2. The broker comes back up: the drain rate is N / (time until replay
   delivered everything).
3. `sluice archive` (fresh directory and group) starts; its rate is N / (time
   from its first archived line to all N lines committed: fdatasynced,
   checkpointed, offsets committed).

Usage: benches/archive.py [N]   (SLUICE=path to the binary; default the
dev-profile one in $CARGO_TARGET_DIR or target/). Prints one JSON line.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
TARGET = os.environ.get("CARGO_TARGET_DIR", "target")
SLUICE = os.environ.get("SLUICE", f"{TARGET}/debug/sluice")


def wait_file(path, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and open(path).read().strip():
            return open(path).read().strip()
        time.sleep(0.05)
    raise RuntimeError(f"{path} never appeared")


def get(addr, path):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
        return r.read().decode()


def metric(addr, name):
    for line in get(addr, "/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main():
    tmp = tempfile.mkdtemp(prefix="sluice-archive-bench-")
    procs = []
    try:
        # The dev broker (librdkafka's mock cluster) keeps the last 5 MiB or
        # 100,000 batches per partition: at most ~15,000 of these events
        # (~250 bytes in Kafka with key and headers) per partition, spread
        # by 1,000 tenant keys, keep every event readable by the archiver.
        partitions = max(3, -(-N // 15_000))
        broker = subprocess.Popen([SLUICE, "dev-broker", "--partitions", str(partitions), "--addr-file", f"{tmp}/broker"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(broker)
        baddr = wait_file(f"{tmp}/broker")
        serve = subprocess.Popen([SLUICE, "serve", "--listen", "127.0.0.1:0", "--data-dir", f"{tmp}/data",
                                  "--brokers", baddr, "--addr-file", f"{tmp}/serve"],
                                 env=dict(os.environ, SLUICE_HTTP_ADMIN_LISTEN=""),
                                 stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/serve.log", "w"))
        procs.append(serve)
        saddr = wait_file(f"{tmp}/serve")
        broker.send_signal(signal.SIGUSR1)
        for b in range(0, N, 1000):
            body = "".join(json.dumps({
                "timestamp": f"2026-11-26T{10 + (i % 4):02}:{i % 60:02}:00Z", "tenant_id": f"t{i % 1000}",
                "source": "web", "message": "GET", "path": f"/p{i % 50}", "userAgent": "bench"}) + "\n"
                for i in range(b, min(b + 1000, N)))
            req = urllib.request.Request(f"http://{saddr}/v1/events", data=body.encode(),
                                         headers={"Content-Type": "application/x-ndjson"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.status == 202, r.status
        last = json.loads(get(saddr, "/stats"))["replay"]["last_seq"]
        t0 = time.time()
        broker.send_signal(signal.SIGUSR2)
        while json.loads(get(saddr, "/stats"))["replay"]["delivered_through"] < last:
            time.sleep(0.05)
        drain = N / (time.time() - t0)
        arch = subprocess.Popen([SLUICE, "archive", "--dir", f"{tmp}/archive", "--brokers", baddr,
                                 "--topic", "events", "--group", "bench", "--listen", "127.0.0.1:0",
                                 "--addr-file", f"{tmp}/archive.addr"],
                                stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/archive.log", "w"))
        procs.append(arch)
        aaddr = wait_file(f"{tmp}/archive.addr")
        while metric(aaddr, "sluice_archive_lines_total") == 0:
            time.sleep(0.01)
        t1 = time.time()
        while metric(aaddr, "sluice_archive_lines_total") < N or \
                json.loads(get(aaddr, "/v1/analytics?from=2026-11-26T10&to=2026-11-26T13"))["total"] < N:
            time.sleep(0.02)
        archive = N / (time.time() - t1)
        fsyncs = metric(aaddr, "sluice_archive_fsyncs_total")
        print(json.dumps({"events": N, "drain_records_per_sec": round(drain),
                          "archive_lines_per_sec": round(archive), "archive_fsyncs": int(fsyncs),
                          "binary": SLUICE}))
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
