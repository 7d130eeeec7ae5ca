# sluice developer targets. `make test` is the README's test command and what
# .ci/run runs; it builds once (dev profile) and runs every test binary with
# its tests in parallel.

CARGO ?= cargo
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= wal_segment wal_record ingest_body config_toml otlp_logs config_serve

.PHONY: run test lint fmt bench bench-quick fuzz fuzz-smoke ci docker chaos deb deb-check e2e-independent e2e-otel chaos-exactly-once chaos-archive test-future kafka-jars kafka-up kafka-down e2e-tansu powercut-fs powercut powercut-smoke

# The daemon with the embedded dev broker (data delivered to Kafka lives in
# memory only). POST to 127.0.0.1:8080, read back with `make consume`.
run:
	$(CARGO) run --release --bin sluice -- serve --dev

test:
	$(CARGO) test --locked --all-features

# `make test` as if it were later: every test process and every daemon it
# starts sees the wall clock moved by FUTURE (libfaketime, from Debian's
# `faketime` package; default 35 days), so a test that depends on today's
# date fails here first. Not in CI. FUTURE takes any libfaketime offset:
# `make test-future FUTURE=+400d`; for an instant, an offset in seconds, e.g.
# FUTURE=+$(( $(date -d '2027-12-31 23:59:58' +%s) - $(date +%s) ))s.
# TEST_FUTURE_ARGS narrows the run: TEST_FUTURE_ARGS='--test archive'.
# The monotonic clock stays real (Rust's and librdkafka's timed waits use it
# or a realtime deadline the kernel would wait for in real time); the C shim
# tests/faketime/cnd_timedwait.c routes librdkafka's cnd_timedwait through
# libfaketime's pthread_cond_timedwait for the same reason.
# docs/design.md, "Testing against the clock".
FUTURE ?= +35d
FAKETIME_LIB ?= /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
FAKETIME_SHIM = $(abspath $(or $(CARGO_TARGET_DIR),target))/faketime/libcndshim.so
test-future:
	@test -e $(FAKETIME_LIB) || { echo "test-future needs libfaketime: apt-get install faketime" >&2; exit 1; }
	$(CARGO) test --locked --all-features --no-run $(TEST_FUTURE_ARGS)
	mkdir -p $(dir $(FAKETIME_SHIM))
	cc -shared -fPIC -O2 -o $(FAKETIME_SHIM) tests/faketime/cnd_timedwait.c
	LD_PRELOAD=$(FAKETIME_SHIM):$(FAKETIME_LIB) FAKETIME='$(FUTURE)' \
		FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME_DONT_RESET=1 \
		$(CARGO) test --locked --all-features $(TEST_FUTURE_ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets --all-features -- -D warnings

fmt:
	$(CARGO) fmt --all

# Criterion micro-benchmarks, then the end-to-end report against baselines
# measured in the same run (benches/e2e.py rewrites its section of
# docs/benchmarks.md, with the issue's targets table, and the plots in
# docs/img/; about 25 minutes). BENCH_SECONDS per load run, BENCH_BACKLOGS_GB
# for the memory and restart curve (default 0.1,1,10, capped to leave
# BENCH_MIN_FREE_GB of the disk free; the backlog is deleted afterwards).
bench:
	$(CARGO) bench --locked --bench wal --bench codec
	$(CARGO) build --release --locked --bins
	@python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
	python3 benches/e2e.py

# A short end-to-end smoke of every step of the bench harness (tiny backlogs,
# 1-3 s runs; plots go to the target dir; docs are not touched).
bench-quick:
	$(CARGO) build --release --locked --bins
	BENCH_QUICK=1 python3 benches/e2e.py

# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the
# stable toolchain this project builds with. Each target runs FUZZ_SECONDS.
# New inputs land in fuzz/corpus/<target>/ (git-ignored except seed-*); a crash
# is saved in fuzz/artifacts/<target>/ - copy it to the corpus as seed-crash-*
# so that `make test` replays it forever. fuzz/<target>.dict, when present,
# gives libFuzzer the target's tokens (config keys, route forms).
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		dict=; [ -f $$t.dict ] && dict=-dict=$$t.dict; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t -- $$dict \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -malloc_limit_mb=512 \
			|| exit 1; \
	done

# CI's short version: every target builds and runs 20 s.
fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=20

ci: lint test chaos-exactly-once

# sluice + Kafka (KRaft) + Prometheus for users with Docker (not run in CI).
docker:
	docker compose up --build

# The kill -9 chaos harness (tests/chaos.rs). `make test` runs 10 cycles of
# the at-least-once mode; MODE=exactly-once adds Idempotency-Key clients and
# the consumer rule (CI runs 10 cycles of it: chaos-exactly-once).
# BROKER=kafka runs it against 3 Apache Kafka brokers (+1 controller-only
# node; jars as for kafka-jars) instead of `sluice dev-broker`, killing a
# broker with SIGKILL every fifth cycle (CHAOS_BROKER_EVERY) and sluice
# every cycle: e.g. `make chaos BROKER=kafka MODE=exactly-once CYCLES=100`
# (about 3 s a cycle here). Not in CI.
CYCLES ?= 200
MODE ?= at-least-once
BROKER ?= dev
chaos:
	@test "$(BROKER)" != kafka || python3 tests/apache-kafka/cluster.py jars >/dev/null
	CHAOS_MODE=$(MODE) CHAOS_BROKER=$(BROKER) CHAOS_CYCLES=$(CYCLES) $(CARGO) test --locked --test chaos

chaos-exactly-once:
	$(MAKE) chaos MODE=exactly-once CYCLES=10

# The Debian package (cargo-deb; [package.metadata.deb] in Cargo.toml):
# target/debian/sluice_<version>-1_<arch>.deb. A release build.
deb:
	@command -v cargo-deb >/dev/null || $(CARGO) install --locked cargo-deb
	$(CARGO) deb --locked --strip

# Builds the package, lints it, installs, checks and purges it (CI; root).
deb-check:
	bash deploy/deb-check.sh

# sluice against a broker and a client that share no code with librdkafka:
# 3 Apache Kafka nodes (the default, E2E_BROKER=kafka:
# tests/apache-kafka/cluster.py; the jars as for kafka-jars) and kafka-python
# in a venv made here (.tools/venv). E2E_BROKER=tansu runs the cases against
# tansu instead (pinned, built from crates.io into .tools/; ~15-20 min the
# first time; `make e2e-tansu`), dev against `sluice dev-broker`. Tools
# already present are reused; point TANSU / E2E_PYTHON at existing ones.
# tests/independent/run.py lists the cases.
TOOLS ?= $(CURDIR)/.tools
TANSU ?= $(TOOLS)/bin/tansu
E2E_PYTHON ?= $(TOOLS)/venv/bin/python
E2E_BROKER ?= kafka
e2e-independent:
	@test "$(E2E_BROKER)" != tansu || test -x $(TANSU) || $(CARGO) install --locked tansu --version 0.6.0 --features dynostore --root $(TOOLS)
	@test "$(E2E_BROKER)" != kafka || python3 tests/apache-kafka/cluster.py jars >/dev/null
	@$(E2E_PYTHON) -c 'import kafka, lz4' 2>/dev/null || { python3 -m venv $(TOOLS)/venv && $(TOOLS)/venv/bin/pip install --quiet kafka-python==3.0.12 lz4==4.4.5; }
	$(CARGO) build --locked --bin sluice
	SLUICE=$${CARGO_TARGET_DIR:-target}/debug/sluice TANSU=$(TANSU) E2E_BROKER=$(E2E_BROKER) $(E2E_PYTHON) tests/independent/run.py

e2e-tansu:
	$(MAKE) e2e-independent E2E_BROKER=tansu

# A real Apache Kafka cluster without Docker (tests/apache-kafka/cluster.py;
# README, "Running against Apache Kafka"). kafka-jars copies the broker's
# jars (version pinned in tests/apache-kafka/pom.xml) with Maven into
# $${XDG_CACHE_HOME:-~/.cache}/sluice (SLUICE_TEST_KAFKA_CACHE overrides it), once.
# kafka-up formats and starts KAFKA_NODES combined broker+controller JVMs on
# 127.0.0.1 with free ports (state, data and logs in KAFKA_STATE, git-ignored),
# creates KAFKA_TOPICS (NAME:PARTITIONS, replication factor min(3, nodes),
# min.insync.replicas min(2, nodes)) and prints the bootstrap servers;
# kafka-down kills the nodes. The same cluster is driven from other shells
# with `python3 tests/apache-kafka/cluster.py --state-dir KAFKA_STATE
# status|kill N|stop N|cont N|restart N|leader TOPIC P|create-topic ...`.
# KAFKA_SASL=1 adds a SASL_SSL (SCRAM) listener per node and ACLs
# (StandardAuthorizer): user `sluice` may write KAFKA_TOPICS, and
# KAFKA_STATE/sluice-sasl.toml holds the settings that reach it.
KAFKA_NODES ?= 3
# KAFKA_CONTROLLERS=1: KAFKA_NODES broker-only nodes and one controller-only
# node (the quorum survives two dead brokers); 0: combined nodes. Not
# together with KAFKA_SASL yet.
KAFKA_CONTROLLERS ?= 0
KAFKA_SASL ?=
KAFKA_STATE ?= $(TOOLS)/kafka-cluster
KAFKA_TOPICS ?= events:3 events-dlq:3
KAFKA_CLUSTER = python3 tests/apache-kafka/cluster.py --state-dir $(KAFKA_STATE)
kafka-jars:
	@python3 tests/apache-kafka/cluster.py jars

kafka-up: kafka-jars
	@$(KAFKA_CLUSTER) up --nodes $(KAFKA_NODES) --controllers $(KAFKA_CONTROLLERS) $(if $(KAFKA_SASL),--sasl) $(addprefix --topic ,$(KAFKA_TOPICS)) >/dev/null
	@test -z "$(KAFKA_SASL)" || { \
	$(KAFKA_CLUSTER) acl add --principal User:sluice --operation Write $(foreach t,$(KAFKA_TOPICS),--topic $(firstword $(subst :, ,$(t)))) >/dev/null && \
	$(KAFKA_CLUSTER) client-config --toml > $(KAFKA_STATE)/sluice-sasl.toml && \
	echo "SASL_SSL: user sluice may write $(KAFKA_TOPICS); cargo run --release --bin sluice -- serve --config $(KAFKA_STATE)/sluice-sasl.toml"; }
	@b=$$($(KAFKA_CLUSTER) bootstrap); \
	echo "Apache Kafka: $(KAFKA_NODES) node(s), bootstrap $$b; topics $(KAFKA_TOPICS)"; \
	echo "point sluice at it:"; \
	echo "  cargo run --release --bin sluice -- serve --brokers $$b"; \
	echo "  (or SLUICE_BROKERS=$$b, or brokers = \"$$b\" in [kafka])"; \
	echo "read back: cargo run --release --bin sluice -- consume --brokers $$b --topic events --from-beginning"; \
	echo "stop it:   make kafka-down"

kafka-down:
	@$(KAFKA_CLUSTER) down

# OpenTelemetry logs from a real OTel client: the Python SDK's LoggerProvider
# and OTLP/HTTP protobuf exporter (PyPI, pinned, in a venv made here:
# .tools/otel-venv) send to `sluice serve --dev`; `sluice consume` reads the
# topic and tests/otel/run.py checks every mapped field.
OTEL_SDK_VERSION ?= 1.45.2
OTEL_PYTHON ?= $(TOOLS)/otel-venv/bin/python
e2e-otel:
	@$(OTEL_PYTHON) -c 'import importlib.metadata as m, sys; sys.exit(any(m.version(p) != "$(OTEL_SDK_VERSION)" for p in ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http")))' 2>/dev/null || { python3 -m venv $(TOOLS)/otel-venv && $(TOOLS)/otel-venv/bin/pip install --quiet opentelemetry-sdk==$(OTEL_SDK_VERSION) opentelemetry-exporter-otlp-proto-http==$(OTEL_SDK_VERSION); }
	$(CARGO) build --locked --bin sluice
	SLUICE=$${CARGO_TARGET_DIR:-target}/debug/sluice $(OTEL_PYTHON) tests/otel/run.py

# kill -9 chaos of `sluice archive` against a `sluice dev-broker` process:
# every produced record in exactly one line, summaries equal a recount.
# `make test` runs 4 cycles; `make chaos-archive` runs CYCLES (default 200,
# as `make chaos`), e.g. `make chaos-archive CYCLES=100`.
chaos-archive:
	ARCHIVE_CHAOS_CYCLES=$(CYCLES) $(CARGO) test --locked --all-features --test archive kill_9 -- --nocapture

# Power-cut chaos (tests/powercut.rs): sluice serve (into Kafka, and with the
# files sink), sluice archive and the offset store (sled) on a powercut-fs
# FUSE mount, killed -9 and cut (one cut in three torn) at random moments,
# also inside recovery. CYCLES is the total, split evenly over PC_MODES
# (default 200: 50 a mode); `make powercut CYCLES=30 PC_MODES=serve` runs
# one mode. Needs /dev/fuse and root (or fusermount3); skips without them
# unless SLUICE_REQUIRE_FUSE=1. powercut-smoke is CI's short run: 10 cycles
# a mode. docs/reliability.md, "Power cut".
PC_MODES ?= serve,files,archive,sled
powercut-fs:
	$(CARGO) build --locked --release --manifest-path tests/powercut-fs/Cargo.toml --target-dir tests/powercut-fs/target

powercut: powercut-fs
	POWERCUT_CYCLES=$(CYCLES) POWERCUT_MODES=$(PC_MODES) $(CARGO) test --locked --all-features --test powercut

powercut-smoke:
	$(MAKE) powercut CYCLES=40 PC_MODES=serve,files,archive,sled
