#!/usr/bin/env python3
"""Reference consumer for sluice's exactly-once rule, on kafka-python.

The rule: for each (instance, partition) keep the highest `seq` seen and drop
any record at or below it. A record carries sluice's `instance` and `seq`
headers last; if a name appears more than once, the LAST one counts (as in
`sluice consume --exactly-once` and `sluice archive`). A record re-sent by
`sluice wal redrive` has the run's own `instance` and `seq` and its first
identity in `origin-instance` / `origin-seq`.

Group membership: the consumer subscribes (a consumer group, so partitions
are spread over the group's members and move on a rebalance). The
high-water marks of a partition travel in the metadata string of that
partition's offset commit: read back when the partition is assigned (before
its first record is judged), written with every commit. A partition that
moves to another member therefore moves with its marks.

Bounded state: the metadata is `{"<instance>": <high seq>, ...}` in the
order the instances were last seen, and at most --metadata-max-bytes (4,096,
Kafka's default `offset.metadata.max.bytes`). When it would be larger, the
instances seen least recently are forgotten first (about 100 UUID instances
fit), and each one forgotten is counted on stderr. A later repeat of a
forgotten instance's record is admitted again: a duplicate, never a loss.

Output and commits: each poll's records are judged and printed, stdout is
flushed, THEN the offsets and marks are committed. A crash between the
flush and the commit prints those records again after the restart (the
output is at-least-once across a crash of this consumer); each repeated line
has the same (instance, seq), so a downstream can drop it by the same rule.
The reverse order (commit, then print) would lose them instead.

Usage: dedupe_consumer.py BOOTSTRAP TOPIC [--group G] [--idle SECONDS]
       [--max N] [--api-version 0.11] [--metadata-max-bytes 4096]
Prints one JSON line per first occurrence:
{"partition","offset","seq","instance","origin_instance","origin_seq","value"}.
--api-version: kafka-python 3.0.12 cannot detect `sluice dev-broker`
(librdkafka's mock cluster); pass 0.11 there. Default: detected.
"""
import argparse
import json
import sys
import time

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata


def header(msg, name):
    """The value of the LAST header called `name`, or None."""
    value = None
    for k, v in msg.headers or []:
        if k == name:
            value = v.decode("utf-8", "replace") if v is not None else None
    return value


class Marks:
    """High-water marks of one partition, most recently seen instance last,
    bounded to `max_bytes` of JSON."""

    def __init__(self, text, max_bytes):
        self.max_bytes = max_bytes
        self.forgotten = 0
        try:
            loaded = json.loads(text) if text else {}
        except ValueError:
            loaded = {}
        self.high = {str(k): int(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}

    def admit(self, instance, seq):
        high = self.high.pop(instance, 0)
        self.high[instance] = max(high, seq)  # re-inserted: now the newest
        return seq > high

    def metadata(self):
        text = json.dumps(self.high, separators=(",", ":"))
        while len(text.encode()) > self.max_bytes and self.high:
            del self.high[next(iter(self.high))]  # the least recently seen
            self.forgotten += 1
            text = json.dumps(self.high, separators=(",", ":"))
        return text


class Listener(ConsumerRebalanceListener):
    def __init__(self, state):
        self.state = state
        self.changed = False  # set on every assignment change (idle restarts)
        self.owned = set()  # partitions owned now (empty while rejoining)

    def on_partitions_revoked(self, revoked):
        # Everything judged was committed with its marks at the end of its
        # poll (a commit refused by a rebalance that had begun is not: the
        # next owner reads those records again and their lines repeat, as
        # after a crash), so the marks are dropped; the next owner reads
        # them back. (kafka-python 3.0.12 does not let this callback commit.)
        for tp in revoked:
            self.state.pop(tp, None)
        self.owned -= set(revoked)
        self.changed = True
        print(f"revoked {sorted(tp.partition for tp in revoked)}", file=sys.stderr, flush=True)

    def on_partitions_assigned(self, assigned):
        # Loaded lazily, before the partition's first record is judged.
        for tp in assigned:
            self.state.pop(tp, None)
        self.owned = set(assigned)
        self.changed = True
        print(f"assigned {sorted(tp.partition for tp in assigned)}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("topic")
    ap.add_argument("--group", default="dedupe-example")
    ap.add_argument("--idle", type=float, default=5.0,
                    help="exit after this many seconds without a record (once assigned)")
    ap.add_argument("--max", type=int, default=None,
                    help="exit after judging this many records (then commit and leave)")
    ap.add_argument("--api-version", default=None,
                    help="broker API version, e.g. 0.11 for `sluice dev-broker`; default detected")
    ap.add_argument("--metadata-max-bytes", type=int, default=4096)
    args = ap.parse_args()

    extra = {}
    if args.api_version:
        extra["api_version"] = tuple(int(p) for p in args.api_version.split("."))
    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **extra,
    )
    state = {}  # tp -> Marks, for the partitions this member owns
    listener = Listener(state)
    # The topic's metadata first: a group leader that assigns before it has
    # it assigns nothing and rejoins at once, and kafka-python 3.0.12 can
    # then miss that second assignment and stop heartbeating (seen against
    # Apache Kafka 4.4: the member sat idle until the broker expired it).
    consumer.partitions_for_topic(args.topic)
    consumer.subscribe([args.topic], listener=listener)

    def marks(tp):
        if tp not in state:
            committed = consumer.committed(tp, metadata=True)
            meta = getattr(committed, "metadata", None) if committed else None
            state[tp] = Marks(meta, args.metadata_max_bytes)
        return state[tp]

    judged = dropped = forgotten = errors = failing = 0
    # --idle counts only while this member owns partitions (a rebalance in
    # progress is not idleness); a member left without any for 60 s exits.
    last = time.time()
    while args.max is None or judged < args.max:
        try:
            batches = consumer.poll(timeout_ms=200)
        except KafkaError as e:
            # A failed join or fetch: poll again (the group is retried),
            # up to 20 times in a row.
            errors += 1
            failing += 1
            print(f"poll: {e!r}; retrying", file=sys.stderr, flush=True)
            if failing >= 20:
                raise
            time.sleep(0.5)
            continue
        failing = 0
        if listener.changed:
            listener.changed = False
            last = time.time()
        if not batches:
            limit = args.idle if listener.owned else max(args.idle, 60.0)
            if time.time() - last > limit:
                break
            continue
        last = time.time()
        offsets = {}
        for tp, msgs in batches.items():
            m_tp = marks(tp)
            for m in msgs:
                if args.max is not None and judged >= args.max:
                    break
                judged += 1
                offsets[tp] = m.offset + 1
                inst, seq = header(m, "instance"), header(m, "seq")
                if inst is None or seq is None or not seq.isdigit():
                    print(json.dumps({"partition": tp.partition, "offset": m.offset,
                                      "unmarked": True}))
                    continue
                seq = int(seq)
                if not m_tp.admit(inst, seq):
                    dropped += 1
                    continue
                try:
                    value = json.loads(m.value)
                except ValueError:
                    value = m.value.decode("utf-8", "replace")
                origin_seq = header(m, "origin-seq")
                print(json.dumps({
                    "partition": tp.partition,
                    "offset": m.offset,
                    "seq": seq,
                    "instance": inst,
                    "origin_instance": header(m, "origin-instance"),
                    "origin_seq": int(origin_seq) if origin_seq and origin_seq.isdigit() else None,
                    "value": value,
                }))
        # Output first, then the offsets and the marks that go with them, in
        # one commit: a crash in between repeats output, never loses it.
        sys.stdout.flush()
        commit = {}
        for tp, offset in offsets.items():
            m_tp = marks(tp)
            commit[tp] = OffsetAndMetadata(offset, m_tp.metadata(), -1)
            forgotten += m_tp.forgotten
            m_tp.forgotten = 0
        if commit:
            try:
                consumer.commit(commit)
            except CommitFailedError as e:
                # A rebalance began after this poll: the partitions' next
                # owner reads these records again from the last commit.
                print(f"commit failed, records will be read again: {e}", file=sys.stderr)
    sys.stdout.flush()
    consumer.close()
    print(f"dropped {dropped} repeated records of {judged}; "
          f"forgot {forgotten} instances to keep commit metadata within "
          f"{args.metadata_max_bytes} bytes; {errors} poll errors retried", file=sys.stderr)


if __name__ == "__main__":
    main()
