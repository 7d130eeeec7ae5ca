#!/usr/bin/env bash
# CPU seconds of the daemon per thread name, and of the whole process, per
# event, over one closed-loop sluice-loadgen run against a dev broker (replay
# is allowed to catch up before the second reading). Alternate two binaries
# (BIN=...) to compare them; a single run on a shared machine means little.
#
#   BIN=path/to/sluice benches/profile/threads.sh LABEL CONNECTIONS BATCH [ENV=VALUE ...]
#
# Threads that exit during the run (the blocking pool's) are missing from
# the per-thread lines but counted in the process line.
set -euo pipefail
label=$1 conns=$2 batch=$3; shift 3
dir=${CARGO_TARGET_DIR:-target}/release
B=${BIN:-$dir/sluice}
LG=${LOADGEN:-$dir/sluice-loadgen}
w=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$w"; }
trap cleanup EXIT
"$B" dev-broker --partitions 16 --addr-file "$w/b.addr" >"$w/b.log" 2>&1 &
pids+=($!)
until [ -s "$w/b.addr" ]; do sleep 0.05; done
env "$@" SLUICE_LOG_LEVEL=warn SLUICE_HTTP_ADMIN_LISTEN= "$B" serve --listen 127.0.0.1:0 \
    --addr-file "$w/s.addr" --data-dir "$w/data" --brokers "$(cat "$w/b.addr")" >"$w/s.log" 2>&1 &
sp=$!
pids+=($sp)
until [ -s "$w/s.addr" ]; do sleep 0.05; done
a=$(cat "$w/s.addr")
ticks() { sed 's/.*) //' "$1" | awk '{print $12+$13}'; }
snap() {
    for t in /proc/$sp/task/*; do
        echo "$(tr ' ' _ <"$t/comm") $(ticks "$t/stat")"
    done | awk '{a[$1]+=$2} END {for (k in a) print k, a[k]}' | sort
}
snap >"$w/before"; p0=$(ticks /proc/$sp/stat)
"$LG" http --url "http://$a/v1/events" --connections "$conns" --batch "$batch" --duration 10 \
    --label "$label" --json-out "$w/o.json" >/dev/null 2>&1
for _ in $(seq 1 300); do
    lag=$(curl -s "http://$a/stats" | python3 -c "import json,sys;print(json.load(sys.stdin)['replay']['lag_records'])")
    [ "$lag" -le 0 ] && break
    sleep 0.2
done
snap >"$w/after"; p1=$(ticks /proc/$sp/stat)
hz=$(getconf CLK_TCK)
n=$(python3 -c "import json;d=json.load(open('$w/o.json'));print(d['accepted_requests']*$batch)")
echo "$label: $n events, process $(python3 -c "print(round(($p1-$p0)/$hz*1e6/$n,2))") us/event"
join -a2 -e0 -o 0,1.2,2.2 "$w/before" "$w/after" | awk -v n="$n" -v hz="$hz" '
    $3 > $2 {d=$3-$2; printf "  %-18s %7.2f s %7.2f us/event\n", $1, d/hz, d/hz*1e6/n}'
