#!/bin/bash
# Issue 26 item 3: peak RSS, offsets/ and idempotency.log on disk of a real daemon under keyed
# requests (docs/benchmarks.md "Idempotency-Key memory").
# usage: benches/idempotency_memory.sh BINARY KEYS THREADS LABEL [extra config lines] ; env NOKEY=1 to send without keys
set -u
BIN=$1 KEYS=$2 THREADS=$3 LABEL=$4 EXTRA=${5:-}
D=$(mktemp -d)
mkdir $D/data
printf '[wal]\nmin-free-bytes = 0\n%b\n' "$EXTRA" > $D/sluice.toml
SLUICE_HTTP_ADMIN_LISTEN=127.0.0.1:0 $BIN serve --config $D/sluice.toml --data-dir $D/data --listen 127.0.0.1:0 --addr-file $D/addr >$D/log 2>&1 &
PID=$!
for i in $(seq 100); do [ -s $D/addr ] && break; sleep 0.2; done
ADDR=$(cat $D/addr)
H0=$(awk '/VmHWM/{print $2}' /proc/$PID/status)
python3 "$(dirname "$0")/idempotency_memory.py" $ADDR $KEYS $THREADS ${NOKEY:+nokey}
sleep 3
H1=$(awk '/VmHWM/{print $2}' /proc/$PID/status); R1=$(awk '/VmRSS/{print $2}' /proc/$PID/status)
OFF=$(du -sk $D/data/offsets | cut -f1)
LOG=$(du -sk $D/data/idempotency.log 2>/dev/null | cut -f1)
M=$(curl -s http://$ADDR/metrics | grep -E '^sluice_idempotency_(keys_held|bytes_held|keys_evicted_total)' | tr '\n' ' ')
echo "$LABEL keys=$KEYS VmHWM ${H0}->${H1} kB, VmRSS ${R1} kB, offsets/ ${OFF} kB, idempotency.log ${LOG:-0} kB; $M"
kill $PID; wait $PID 2>/dev/null
rm -rf $D
