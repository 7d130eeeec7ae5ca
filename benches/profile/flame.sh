#!/usr/bin/env bash
# A CPU flame graph of the daemon under sluice-loadgen: sluice's own sampling
# profiler (/debug/pprof/profile on the admin listener, every thread,
# librdkafka's included) while loadgen drives it against a dev broker.
#
#   benches/profile/flame.sh OUT.svg CONNECTIONS BATCH [SECONDS]
set -euo pipefail
out=$1 conns=$2 batch=$3 secs=${4:-8}
dir=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

"$dir/sluice" dev-broker --partitions 16 --addr-file "$work/broker.addr" >"$work/broker.log" 2>&1 &
pids+=($!)
until [ -s "$work/broker.addr" ]; do sleep 0.1; done
SLUICE_LOG_LEVEL=warn SLUICE_HTTP_ADMIN_LISTEN=127.0.0.1:$port SLUICE_HTTP_PROFILING=true \
    "$dir/sluice" serve --listen 127.0.0.1:0 --addr-file "$work/sluice.addr" \
    --data-dir "$work/data" --brokers "$(cat "$work/broker.addr")" >"$work/sluice.log" 2>&1 &
pids+=($!)
until [ -s "$work/sluice.addr" ]; do sleep 0.1; done
"$dir/sluice-loadgen" http --url "http://$(cat "$work/sluice.addr")/v1/events" \
    --connections "$conns" --batch "$batch" --duration $((secs + 4)) >"$work/loadgen.log" 2>&1 &
lg=$!
sleep 2
curl -sf -o "$out" "http://127.0.0.1:$port/debug/pprof/profile?seconds=$secs&format=svg"
wait "$lg"
cat "$work/loadgen.log"
