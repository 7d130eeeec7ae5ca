#!/usr/bin/env bash
# Static checks of the deploy files that this machine can run:
# systemd-analyze verify on the unit (with ExecStart pointed at a binary that
# exists here); promtool on the Prometheus config, the alert rules and their
# unit tests; every PromQL expression of the Grafana dashboard parses (the
# metrics they name are checked against a real scrape by tests/deploy.rs);
# the docker build context leaves target/ and fuzz/ out.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-$(pwd)/target}/debug/sluice"
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
  promtool check rules deploy/prometheus/alerts.yml
  promtool test rules deploy/prometheus/alerts_test.yml
  python3 deploy/check-promql.py deploy/grafana/sluice.json
elif [ -n "${SLUICE_REQUIRE_PROMTOOL:-}" ]; then
  echo "FAIL: promtool not installed (apt-get install prometheus)"; exit 1
else
  echo "promtool not available: Prometheus config, rules and dashboard not checked"
fi
python3 deploy/check-dockerignore.py
# The packaged unit is the same unit with the binary in /usr/bin.
if ! diff <(sed 1d deploy/sluice.service | sed 's|/usr/local/bin/sluice|/usr/bin/sluice|') \
          <(sed 1d deploy/debian/sluice.service); then
  echo "FAIL: deploy/debian/sluice.service drifted from deploy/sluice.service (diff above)"; exit 1
fi
echo "deploy/debian/sluice.service: same unit as deploy/sluice.service"
