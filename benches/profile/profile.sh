#!/usr/bin/env bash
# Instruction counts of the whole daemon (replay and librdkafka included) per
# ingest request, with callgrind: sluice runs under valgrind against a dev
# broker, counters are zeroed once it is ready, drive.py sends a fixed number
# of requests, and the counts are dumped. Counts repeat on a busy machine;
# times do not.
#
#   benches/profile/profile.sh NAME REQUESTS BATCH [--idempotency]
#
# Writes $OUT/NAME.callgrind and prints Ir/request and Ir/event.
# BIN defaults to $CARGO_TARGET_DIR/release/sluice.
set -euo pipefail
name=$1 requests=$2 batch=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}
OUT=${OUT:-/tmp/sluice-profile}
mkdir -p "$OUT"
rm -f "$OUT/$name.callgrind"*
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

"$BIN" dev-broker --partitions 4 --addr-file "$work/broker.addr" >"$work/broker.log" 2>&1 &
pids+=($!)
until [ -s "$work/broker.addr" ]; do sleep 0.1; done

SLUICE_LOG_LEVEL=warn SLUICE_HTTP_ADMIN_LISTEN= \
valgrind --tool=callgrind --callgrind-out-file="$OUT/$name.callgrind" \
    "$BIN" serve --listen 127.0.0.1:0 --addr-file "$work/sluice.addr" \
    --data-dir "$work/data" --brokers "$(cat "$work/broker.addr")" >"$work/sluice.log" 2>&1 &
vg=$!
pids+=($vg)
until [ -s "$work/sluice.addr" ]; do sleep 0.2; done
addr=$(cat "$work/sluice.addr")
# Warm up (connections, first segment, producer), then count from zero.
python3 "$here/drive.py" "$addr" 8 "$batch" "$@"
sleep 2
callgrind_control -z "$vg" >/dev/null
python3 "$here/drive.py" "$addr" "$requests" "$batch" "$@"
sleep 2  # let replay deliver what was just written
callgrind_control -d "$vg" >/dev/null
kill -TERM "$vg"; wait "$vg" || true
# Part 1 is the dump taken above: from the zeroing to the end of the run.
part="$OUT/$name.callgrind.1"
ir=$(grep -h '^summary:' "$part" | awk '{print $2}')
echo "$name: $ir Ir over $requests requests x $batch events (file $part)"
python3 -c "ir=$ir; r=$requests; b=$batch; print(f'$name: {ir/r:,.0f} Ir/request, {ir/(r*b):,.0f} Ir/event')"
