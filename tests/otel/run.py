#!/usr/bin/env python3
"""OpenTelemetry logs into sluice with a client nobody here wrote.

The OpenTelemetry Python SDK (LoggerProvider, BatchLogRecordProcessor) and its
OTLP/HTTP protobuf exporter (OTLPLogExporter) send log records to a
`sluice serve --dev` daemon's /v1/logs; `sluice consume` then reads the topic
from the embedded dev broker and every mapped field of every event is checked:
message, severity, timestamp, source, tenant, trace/span ids and flags,
record, resource and scope attributes, the Kafka key and headers.

`make e2e-otel` pins the PyPI packages in .tools/otel-venv and runs this with
that venv's python. Environment: SLUICE (the sluice binary).
Exit 0 and "N passed, 0 failed" when every check held.
"""

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)

ROOT = Path(__file__).resolve().parents[2]
SLUICE = os.environ.get("SLUICE", str(ROOT / "target" / "debug" / "sluice"))
TOPIC = "events"
DEADLINE = 60.0

TRACE_ID = 0x5B8EFFF798038103D269B633813FC60C
SPAN_ID = 0xEEE19B7EC3C1B174

passed, failed = 0, 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}", flush=True)


def wait_for(what, fn, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def start_sluice(work):
    addr_file = work / "addr"
    log = open(work / "sluice.log", "w")
    # Any free ports: the admin listener's default may be taken.
    env = dict(os.environ, SLUICE_LOG_FORMAT="json", SLUICE_KAFKA_TOPIC=TOPIC,
               SLUICE_HTTP_ADMIN_LISTEN="127.0.0.1:0")
    proc = subprocess.Popen(
        [SLUICE, "serve", "--dev", "--listen", "127.0.0.1:0",
         "--data-dir", str(work / "data"), "--addr-file", str(addr_file)],
        stdout=log, stderr=subprocess.STDOUT, env=env)

    def bootstrap():
        if proc.poll() is not None:
            raise SystemExit(f"sluice exited: {(work / 'sluice.log').read_text()}")
        for line in (work / "sluice.log").read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            bootstrap = entry.get("bootstrap") or entry.get("fields", {}).get("bootstrap")
            if bootstrap:
                return bootstrap
        return None

    brokers = wait_for("the dev broker's address", bootstrap)
    addr = wait_for("sluice's address", lambda: addr_file.exists() and addr_file.read_text().strip())
    return proc, addr, brokers


def emit(endpoint):
    """Logs through the SDK as an application would: the stdlib logging
    bridge (LoggingHandler) and the Logs API, inside a sampled span."""
    resource = Resource.create({
        "service.name": "Checkout-Service",
        "service.version": "2.4.1",
        "tenant.id": "acme",
        "deployment.environment": "e2e",
    })
    provider = LoggerProvider(resource=resource)
    exporter = OTLPLogExporter(endpoint=endpoint, timeout=10)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter))

    handler = LoggingHandler(level=logging.DEBUG, logger_provider=provider)
    pylog = logging.getLogger("checkout.payments")
    pylog.setLevel(logging.DEBUG)
    pylog.addHandler(handler)
    pylog.propagate = False

    ctx = set_span_in_context(NonRecordingSpan(SpanContext(
        trace_id=TRACE_ID, span_id=SPAN_ID, is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED))))
    from opentelemetry import context as otel_context
    token = otel_context.attach(ctx)
    try:
        pylog.warning("payment declined for order %s", 42,
                      extra={"order.id": 42, "card.brand": "visa", "amount": 12.5})
    finally:
        otel_context.detach(token)
    pylog.debug("cache miss")
    pylog.error("upstream timeout", extra={"retryable": True})
    pylog.critical("ledger unavailable")
    pylog.info("  padded  ")

    ok = provider.force_flush(timeout_millis=20_000)
    provider.shutdown()
    return ok


def consume(brokers, n):
    out = subprocess.run(
        [SLUICE, "consume", "--brokers", brokers, "--topic", TOPIC,
         "--from-beginning", "--max", str(n), "--timeout", "20"],
        capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"sluice consume failed: {out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def main():
    with tempfile.TemporaryDirectory(prefix="sluice-otel-") as tmp:
        work = Path(tmp)
        proc, addr, brokers = start_sluice(work)
        try:
            before = time.time_ns()
            check(emit(f"http://{addr}/v1/logs"), "the SDK's force_flush reported success")
            after = time.time_ns()
            recs = consume(brokers, 5)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        check(len(recs) == 5, f"5 records in the topic, got {len(recs)}")
        by_msg = {r["value"].get("message"): r for r in recs}
        print(json.dumps(by_msg.get("payment declined for order 42", {}), indent=1), flush=True)

        for r in recs:
            v, m = r["value"], r["value"].get("metadata", {})
            what = v.get("message")
            check(v.get("tenant_id") == "acme", f"{what}: tenant_id from resource tenant.id")
            check(r.get("key") == "acme", f"{what}: Kafka key is the tenant")
            check(r["headers"].get("tenant") == "acme", f"{what}: tenant header")
            check(r["headers"].get("id") == v.get("id"), f"{what}: id header matches the event id")
            check(v.get("source") == "checkout-service", f"{what}: source from service.name, lower-cased")
            res = m.get("resource", {})
            check(res.get("service.name") == "Checkout-Service", f"{what}: resource attributes kept")
            check(res.get("service.version") == "2.4.1", f"{what}: service.version")
            check(res.get("deployment.environment") == "e2e", f"{what}: custom resource attribute")
            check(res.get("telemetry.sdk.language") == "python", f"{what}: SDK resource attribute")
            check(m.get("scope", {}).get("name") == "checkout.payments", f"{what}: scope name is the logger name")
            ts = v.get("timestamp", "")
            # RFC 3339 UTC with the SDK's nanosecond time, within the run.
            from datetime import datetime
            try:
                secs = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            except ValueError:
                secs = 0
            check(before / 1e9 - 1 <= secs <= after / 1e9 + 1, f"{what}: timestamp {ts} within the run")
            check(ts.endswith("Z"), f"{what}: timestamp is UTC")
            check(abs(r.get("timestamp_ms", 0) / 1000 - secs) < 0.002, f"{what}: Kafka timestamp is the record time")
            check("observed_timestamp" in m, f"{what}: observed time kept")
            code_attrs = m.get("attributes", {})
            check("code.function.name" in code_attrs or "code.function" in code_attrs,
                  f"{what}: the SDK's code.* attributes kept: {sorted(code_attrs)}")

        expect = {
            "payment declined for order 42": ("WARN", 13, "WARN"),
            "cache miss": ("DEBUG", 5, "DEBUG"),
            "upstream timeout": ("ERROR", 17, "ERROR"),
            "ledger unavailable": ("FATAL", 21, "FATAL"),  # the SDK writes FATAL for CRITICAL
            "padded": ("INFO", 9, "INFO"),
        }
        for msg, (sev, num, text) in expect.items():
            r = by_msg.get(msg)
            check(r is not None, f"event with message {msg!r} (trimmed) arrived")
            if r is None:
                continue
            v, m = r["value"], r["value"]["metadata"]
            check(v.get("severity") == sev, f"{msg}: severity {v.get('severity')} == {sev}")
            check(m.get("severity_number") == num, f"{msg}: severity_number {m.get('severity_number')} == {num}")
            check(m.get("severity_text") == text, f"{msg}: severity_text {m.get('severity_text')} == {text}")

        r = by_msg.get("payment declined for order 42")
        if r is not None:
            m = r["value"]["metadata"]
            check(m.get("trace_id") == f"{TRACE_ID:032x}", f"trace_id hex: {m.get('trace_id')}")
            check(m.get("span_id") == f"{SPAN_ID:016x}", f"span_id hex: {m.get('span_id')}")
            check(m.get("trace_flags") == 1, f"trace_flags: {m.get('trace_flags')}")
            a = m.get("attributes", {})
            check(a.get("order.id") == 42, f"int attribute: {a.get('order.id')!r}")
            check(a.get("card.brand") == "visa", "string attribute")
            check(a.get("amount") == 12.5, f"double attribute: {a.get('amount')!r}")
        r = by_msg.get("upstream timeout")
        if r is not None:
            m = r["value"]["metadata"]
            check(m.get("attributes", {}).get("retryable") is True, "bool attribute")
            check("trace_id" not in m, "no trace_id outside a span")

    print(f"otel: {passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
