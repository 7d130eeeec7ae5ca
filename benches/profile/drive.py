#!/usr/bin/env python3
"""A fixed number of ingest requests over keep-alive connections, for
instruction-count profiles (callgrind counts do not depend on how fast the
client is, so a slow, simple client is fine). Events have the shape
sluice-loadgen sends (about 250 bytes each).

    drive.py ADDR REQUESTS BATCH [--idempotency] [--conns N]
"""
import argparse
import http.client
import json
import threading
import uuid


def event(n, size=250):
    base = {"tenant_id": "loadgen", "source": "loadgen", "severity": "INFO", "message": ""}
    pad = max(0, size - len(json.dumps(base, separators=(",", ":"))) - 12)
    return {"tenant_id": "loadgen", "source": "loadgen", "severity": "INFO",
            "message": f"{n:010} " + "x" * pad}


def body(batch):
    if batch == 1:
        return json.dumps(event(0), separators=(",", ":")).encode()
    return json.dumps([event(i) for i in range(batch)], separators=(",", ":")).encode()


def run(addr, n, batch, idem, errors):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    b = body(batch)
    for _ in range(n):
        h = {"Content-Type": "application/json"}
        if idem:
            h["Idempotency-Key"] = str(uuid.uuid4())
        c.request("POST", "/v1/events", body=b, headers=h)
        r = c.getresponse()
        data = r.read()
        if r.status != 202 or json.loads(data)["accepted"] != batch:
            errors.append((r.status, data[:200]))


def main():
    a = argparse.ArgumentParser()
    a.add_argument("addr")
    a.add_argument("requests", type=int)
    a.add_argument("batch", type=int)
    a.add_argument("--idempotency", action="store_true")
    a.add_argument("--conns", type=int, default=4)
    args = a.parse_args()
    errors = []
    per = [args.requests // args.conns + (i < args.requests % args.conns) for i in range(args.conns)]
    ts = [threading.Thread(target=run, args=(args.addr, k, args.batch, args.idempotency, errors))
          for k in per]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests not fully accepted, first: {errors[0]}")


if __name__ == "__main__":
    main()
