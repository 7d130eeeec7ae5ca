#!/usr/bin/env bash
# Static checks of the deploy files that this machine can run:
# systemd-analyze verify on the unit (with ExecStart pointed at a binary that
# exists here) and promtool check config on the Prometheus config.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(pwd)/target/debug/sluice"
if command -v systemd-analyze >/dev/null; then
  tmp=$(mktemp -d)
  sed "s|/usr/local/bin/sluice|$bin|" deploy/sluice.service > "$tmp/sluice.service"
  out=$(systemd-analyze verify "$tmp/sluice.service" 2>&1 || true)
  rm -rf "$tmp"
  if [ -n "$out" ]; then echo "systemd-analyze verify:"; echo "$out"; exit 1; fi
  echo "deploy/sluice.service: systemd-analyze verify OK"
else
  echo "systemd-analyze not available: unit not verified"
fi
if command -v promtool >/dev/null; then
  promtool check config deploy/prometheus.yml
fi
