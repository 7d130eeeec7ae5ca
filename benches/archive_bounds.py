#!/usr/bin/env python3
"""Issue 26 items 1 and 2 at the issue's scale against a release `sluice serve`
with the files sink. Usage: benches/archive_bounds.py EXE values|hours|onehour|fill"""
import json, os, subprocess, sys, threading, time, http.client, tempfile, shutil

exe, shape = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp(dir=os.environ.get("TMPDIR", "/tmp"))
data, arch = os.path.join(tmp, "data"), os.path.join(tmp, "archive")
cfg = os.path.join(tmp, "c.toml")
open(cfg, "w").write('[events]\nrequired = []\n[sink]\nkind = "files"\n[archive]\ndir = "%s"\nidle-close-secs = 3600\n' % arch)
addr_file = os.path.join(tmp, "addr")

def start():
    p = subprocess.Popen([exe, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--addr-file", addr_file, "--config", cfg],
                         env=dict(os.environ, SLUICE_HTTP_ADMIN_LISTEN="", RUST_LOG="sluice=warn"),
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "log"), "a"))
    while not (os.path.exists(addr_file) and open(addr_file).read().strip()):
        assert p.poll() is None, open(os.path.join(tmp, "log")).read()
        time.sleep(0.05)
    a = open(addr_file).read().strip(); os.remove(addr_file)
    return p, a

def req(a, method, path, body=None):
    h, port = a.rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(port), timeout=600)
    c.request(method, path, body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse(); b = r.read(); c.close()
    return r.status, b

def metric(a, name):
    _, b = req(a, "GET", "/metrics")
    for l in b.decode().splitlines():
        if l.startswith(name + " "):
            return float(l.split()[1])
    return None

def hwm(p):
    for l in open("/proc/%d/status" % p.pid):
        if l.startswith("VmHWM:"):
            return int(l.split()[1]) // 1024

def checkpoint_size():
    """DIR/checkpoint and the open hours' files in DIR/checkpoint.d/."""
    n = os.path.getsize(os.path.join(arch, "checkpoint"))
    d = os.path.join(arch, "checkpoint.d")
    for f in os.listdir(d) if os.path.isdir(d) else []:
        try: n += os.path.getsize(os.path.join(d, f))
        except OSError: pass
    return n

cp_max = [0]
written_max = [0]
stop = [False]
def sampler():
    while not stop[0]:
        try: cp_max[0] = max(cp_max[0], checkpoint_size())
        except OSError: pass
        time.sleep(0.05)

def written_sampler():
    # The bytes each commit wrote to the checkpoint (the gauge of the last one).
    while not stop[0]:
        try: written_max[0] = max(written_max[0], metric(a, "sluice_sink_checkpoint_written_bytes") or 0)
        except OSError: pass
        time.sleep(0.05)

p, a = start()
threading.Thread(target=sampler, daemon=True).start()
threading.Thread(target=written_sampler, daemon=True).start()
t0 = time.time()
if shape == "values":
    # The repro: 32 POSTs of 10 events, each a distinct ~900 KB path.
    def send(t):
        for i in range(8):
            ev = [{"id": "v-%d-%d-%d" % (t, i, k), "timestamp": "2026-11-26T12:00:00Z", "tenant_id": "t",
                   "source": "web", "severity": "INFO", "message": "m",
                   "path": "/%d-%d-%d/" % (t, i, k) + "p" * 900_000} for k in range(10)]
            s, b = req(a, "POST", "/logs", json.dumps(ev))
            assert s == 202, (s, b[:200])
    total = 320
    th = [threading.Thread(target=send, args=(t,)) for t in range(4)]
elif shape == "fill":
    # The bound's own worst case for one field: 64 open hours, each with
    # 1,000 distinct 300-byte paths (cut to 256), 64,000 events.
    def send(t):
        for i in range(16):
            ev = [{"id": "f-%d-%d-%d" % (t, i, k), "timestamp": "2026-11-%02dT%02d:00:00Z" % (1 + (t * 16 + i) // 24, (t * 16 + i) % 24),
                   "tenant_id": "t", "source": "web", "severity": "INFO", "message": "m",
                   "path": "/%d-%d-%d/" % (t, i, k) + "p" * 300} for k in range(1000)]
            s, b = req(a, "POST", "/logs", json.dumps(ev))
            assert s == 202, (s, b[:200])
    total = 64_000
    th = [threading.Thread(target=send, args=(t,)) for t in range(4)]
else:
    # 100,000 events over 100,000 distinct hours, from 2001 on.
    import datetime
    base = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)
    def send(t):
        for i in range(25):
            ev = []
            for k in range(1000):
                n = (t * 25 + i) * 1000 + k
                ts = (base + datetime.timedelta(hours=0 if shape == "onehour" else n)).strftime("%Y-%m-%dT%H:%M:%SZ")
                ev.append({"id": "h-%d" % n, "timestamp": ts, "tenant_id": "t", "source": "web",
                           "severity": "INFO", "message": "m", "path": "/p"})
            s, b = req(a, "POST", "/logs", json.dumps(ev))
            assert s == 202, (s, b[:200])
    total = 100_000
    th = [threading.Thread(target=send, args=(t,)) for t in range(4)]
for x in th: x.start()
for x in th: x.join()
sent = time.time() - t0
while metric(a, "sluice_sink_lines_total") != total:
    time.sleep(0.2)
drained = time.time() - t0
time.sleep(0.3)
stop[0] = True
one_line = None
if shape == "fill":
    # One more line, in one of the 64 full hours: what its commit writes.
    ev = [{"id": "one", "timestamp": "2026-11-01T00:30:00Z", "tenant_id": "t", "source": "web",
           "severity": "INFO", "message": "m", "path": "/one"}]
    assert req(a, "POST", "/logs", json.dumps(ev))[0] == 202
    total += 1
    while metric(a, "sluice_sink_lines_total") != total:
        time.sleep(0.2)
    time.sleep(0.3)
    one_line = int(metric(a, "sluice_sink_checkpoint_written_bytes"))
files = sum(len(f) for _, _, f in os.walk(arch))
print(json.dumps({"shape": shape, "sent_s": round(sent, 1), "drained_s": round(drained, 1),
    "checkpoint_max_bytes": cp_max[0], "checkpoint_now": checkpoint_size(),
    "checkpoint_written_max_bytes": int(written_max[0]), "checkpoint_written_one_line_bytes": one_line,
    "files": files, "vmhwm_mib": hwm(p), "fsyncs": metric(a, "sluice_sink_fsyncs_total"),
    "values_cut": metric(a, "sluice_sink_values_cut_total"),
    "sealed_over_bound": metric(a, "sluice_sink_files_sealed_over_bound_total")}))
p.kill(); p.wait()
t1 = time.time()
p, a = start()
while req(a, "GET", "/ready")[0] != 200:
    time.sleep(0.1)
print(json.dumps({"restart_ready_s": round(time.time() - t1, 1), "vmhwm_mib_after_restart": hwm(p)}))
p.terminate(); p.wait()
shutil.rmtree(tmp)
