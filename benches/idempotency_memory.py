#!/usr/bin/env python3
"""Keyed requests of 1 good event + 78 rejected ones (issue 26 item 3), or
one event (SHAPE=small); driven by idempotency_memory.sh.
usage: idempotency_memory.py HOST:PORT KEYS THREADS [nokey]"""
import http.client, json, sys, threading, time
addr, keys, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
nokey = len(sys.argv) > 4
host, port = addr.rsplit(":", 1)
batch = [{"tenant_id": "acme", "source": "web", "message": "kept"}]
batch += [{"id": f"{i:03}-" + "x" * 96, "tenant_id": "acme", "message": "no source"} for i in range(78)]
import os
if os.environ.get("SHAPE") == "small":
    batch = batch[:1]
body = json.dumps(batch).encode()
statuses, sizes = {}, []
lock = threading.Lock()
def run(t):
    c = http.client.HTTPConnection(host, int(port))
    for i in range(t, keys, threads):
        h = {"Content-Type": "application/json"}
        if not nokey:
            h["Idempotency-Key"] = f"8e03978e-40d5-43e8-bc93-{i:012}"
        for attempt in range(20):
            try:
                c.request("POST", "/v1/events", body, h)
                r = c.getresponse(); b = r.read()
                break
            except Exception:
                c.close(); c = http.client.HTTPConnection(host, int(port)); time.sleep(0.05)
        with lock:
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if i == 0: sizes.append(len(b))
start = time.time()
ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"{keys} requests in {time.time()-start:.1f}s, statuses {statuses}, body {len(body)} B, answer {sizes} B")
