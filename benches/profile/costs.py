#!/usr/bin/env python3
"""Inclusive and exclusive instruction counts per request for the functions
that matter, from a callgrind dump (callgrind_annotate output), and the top
exclusive costs with the async/thread plumbing folded away.

    costs.py FILE.callgrind.1 REQUESTS EVENTS_PER_REQUEST [TOP]
"""
import re
import subprocess
import sys

path, requests, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 10


def annotate(inclusive):
    out = subprocess.run(["callgrind_annotate", f"--inclusive={inclusive}", "--auto=no",
                          "--threshold=100", path], capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*?):(.+?)( \[.*\])?$", line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        fn = m.group(3)
        # Inlined code is reported per source file: sum a function's parts
        # for exclusive counts, keep the largest for inclusive ones.
        if inclusive == "yes":
            rows[fn] = max(rows.get(fn, 0), ir)
        else:
            rows[fn] = rows.get(fn, 0) + ir
    return rows


total = int(re.search(r"summary: (\d+)", open(path).read()).group(1))
print(f"total: {total / requests:,.0f} Ir/request, {total / (requests * batch):,.0f} Ir/event")
inc = annotate("yes")
for label, pat in [
    ("HTTP connection tasks (hyper, axum, handler)", r"^sluice::http::listener::serve::\{\{closure\}\}::\{\{closure\}\}$"),
    ("ingest handler (accept)", r"^sluice::http::ingest::accept::\{\{closure\}\}$"),
    ("parse + normalize (ingest::prepare)", r"^sluice::ingest::prepare$"),
    ("  body split (parse_body)", r"^sluice::ingest::parse::parse_body$"),
    ("  normalize, per event", r"^sluice::ingest::event::Normalizer::normalize_(raw|at)$"),
    ("idempotency stamp", r"^sluice::idempotency::Pending::stamp$"),
    ("idempotency checkpoint (sled)", r"^sluice::idempotency::Index::checkpoint$"),
    ("WAL writer thread", r"^sluice::wal::writer::Writer::run$"),
    ("replayer task", r"^sluice::replay::replayer::Replayer::incarnation::\{\{closure\}\}$"),
    ("  Record::decode", r"^sluice::wal::record::Record::decode$"),
    ("librdkafka broker thread", r"^rd_kafka_broker_thread_main$"),
    ("  LZ4 compression", r"^rd_kafka_lz4_compress$"),
    ("librdkafka main thread", r"^rd_kafka_thread_main$"),
]:
    v = max((ir for fn, ir in inc.items() if re.search(pat, fn)), default=0)
    print(f"{label:48s} {v / requests:>10,.0f} Ir/request {v / (requests * batch):>9,.0f} Ir/event")
exc = annotate("no")
plumbing = re.compile(r"tokio::runtime::(task|context|scheduler|blocking)|start_thread|clone$|"
                      r"thread_start|call_once\{\{vtable|__rust_begin_short_backtrace")
rows = sorted(((ir, fn) for fn, ir in exc.items() if not plumbing.search(fn)), reverse=True)
print(f"top {top} exclusive (self) costs:")
for ir, fn in rows[:top]:
    print(f"  {ir / (requests * batch):>8,.0f} Ir/event  {ir / total * 100:5.1f}%  {fn[:110]}")
