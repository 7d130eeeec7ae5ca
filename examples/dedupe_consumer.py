#!/usr/bin/env python3
"""Reference consumer for sluice's exactly-once rule, on kafka-python.

For each (instance, partition) keep the highest `seq` header seen and drop
any record at or below it. The high-water marks travel in the metadata of
the consumer group's offset commits, so they move with a partition on a
rebalance and survive restarts.

Usage: dedupe_consumer.py BOOTSTRAP TOPIC [--group G] [--idle SECONDS]
Prints one JSON line per first occurrence: {"partition","seq","instance","value"}.
"""
import argparse
import json
import sys
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata


def header(msg, name):
    for k, v in msg.headers or []:
        if k == name:
            return v.decode("utf-8", "replace")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("topic")
    ap.add_argument("--group", default="dedupe-example")
    ap.add_argument("--idle", type=float, default=5.0)
    args = ap.parse_args()

    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    parts = consumer.partitions_for_topic(args.topic) or set()
    tps = [TopicPartition(args.topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    # high[tp] = {instance: highest seq}, restored from the committed metadata.
    high = {}
    for tp in tps:
        committed = consumer.committed(tp, metadata=True)
        meta = getattr(committed, "metadata", None) if committed else None
        high[tp] = json.loads(meta) if meta else {}

    dropped = 0
    last = time.time()
    while time.time() - last < args.idle:
        batches = consumer.poll(timeout_ms=200)
        if not batches:
            continue
        last = time.time()
        for tp, msgs in batches.items():
            for m in msgs:
                inst, seq = header(m, "instance"), header(m, "seq")
                if inst is None or seq is None:
                    print(json.dumps({"partition": tp.partition, "unmarked": True}))
                    continue
                seq = int(seq)
                if seq <= high[tp].get(inst, 0):
                    dropped += 1
                    continue
                high[tp][inst] = seq
                print(json.dumps({
                    "partition": tp.partition,
                    "seq": seq,
                    "instance": inst,
                    "value": json.loads(m.value),
                }))
            # The offset and the state that goes with it, in one commit.
            consumer.commit({tp: OffsetAndMetadata(msgs[-1].offset + 1, json.dumps(high[tp]), -1)})
    sys.stdout.flush()
    print(f"dropped {dropped} repeated records", file=sys.stderr)
    consumer.close()


if __name__ == "__main__":
    main()
