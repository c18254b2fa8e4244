#!/usr/bin/python3
"""Development aid for lib/server/status_page.html: serves the page at "/"
(and at "/prefix/", to check its relative "status" URL) and a fake
"/status" in the admin listener's schema. Not a test by itself; the real
test (status_page_test.py) runs against kvlink-server.

  /usr/bin/python3 test/admin/mock_status_server.py --port 8099 \
      [--scenario full|empty|many] [--token SECRET] [--fail-after N]

  full:  a few instances (one disconnected, one scheduler, one tcp peer),
         namespaces, 15 minutes of history, events
  empty: no instances, no history, no events
  many:  400 instances, 100 events
"""
import argparse
import http.server
import json
import os
import random
import time

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, default=8099)
ap.add_argument("--page", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "..", "..", "lib", "server", "status_page.html"))
ap.add_argument("--scenario", choices=["full", "empty", "many"], default="full")
ap.add_argument("--token", default="")
ap.add_argument("--fail-after", type=int, default=0,
                help="after this many /status answers, drop every connection (the server is gone)")
args = ap.parse_args()

STARTED = time.time() - 3723.5
GIB = 1 << 30


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def hexid(n):
    return "%016x" % (0x1f2e3d4c5b6a7988 + n * 0x9e3779b97f4a7c15 & (1 << 64) - 1)


def instance(n, connected=True, scheduler=False, tcp=False, error=""):
    reg = None
    if not scheduler:
        reg = {"model": "llama-3-8b" if n % 3 else "mistral-7b-instruct-v0.3", "namespace": hexid(1000 + n % 3),
               "world_size": 2, "kv_rank": n % 2, "chunk_bytes": 524288,
               "layout": "32 layers, block 16 tokens, 8 kv heads x 128, bf16, layer-major"}
    return {"id": hexid(n), "role": "scheduler" if scheduler else "worker",
            "client": "kvlink-engine-sim" if n % 2 else "vllm 0.9.1 <script>alert(1)</script>",
            "pid": None if tcp else 4000 + n, "uid": None if tcp else 1000,
            "peer": "tcp 127.0.0.1:5%04d" % n if tcp else "pid %d uid 1000" % (4000 + n),
            "connected": connected, "connections": 1 if connected else 0,
            "last_seen_seconds_ago": 0.3 if connected else 95.0 + n,
            "registration": reg, "transfers_in_flight": (n % 4) if connected else 0,
            "data_path_error": error}


def status():
    now = time.time()
    sc = args.scenario
    if sc == "empty":
        instances, history, events, namespaces, tiers, used = [], [], [], [], [], 0
    else:
        count = 400 if sc == "many" else 5
        instances = []
        for n in range(count):
            instances.append(instance(n, connected=(n % 5 != 3), scheduler=(n == 0), tcp=(n == 4),
                                      error="memfd mapping failed: ENOMEM" if n == 2 else ""))
        used = int(0.62 * GIB + (now % 60) * 1e6)
        namespaces = [{"namespace": hexid(1000), "model": "mistral-7b-instruct-v0.3", "chunks": 400, "bytes": 400 * 524288},
                      {"namespace": hexid(1001), "model": "llama-3-8b", "chunks": 870, "bytes": 870 * 524288}]
        tiers = [{"name": "disk", "healthy": True, "chunks": 5200, "bytes": 5200 * 524288, "capacity_bytes": 4 << 30,
                  "writes": 9100, "write_bytes": 9100 * 524288, "writes_failed": 0, "writes_skipped": 3, "reads": 2200,
                  "read_bytes": 2200 * 524288, "reads_failed": 1, "corrupt_dropped": 2, "transitions": 0, "nodes": []},
                 {"name": "cluster", "healthy": True, "chunks": 0, "bytes": 0, "capacity_bytes": 0,
                  "writes": 14000, "write_bytes": 14000 * 524288, "writes_failed": 40, "writes_skipped": 0,
                  "reads": 800, "read_bytes": 800 * 524288, "reads_failed": 12, "corrupt_dropped": 0, "transitions": 2,
                  "nodes": [{"address": "10.0.0.%d:6379" % n, "healthy": n != 2, "slots": 5461 + (n == 0)}
                            for n in range(3)]}]
        history = []
        req = hit = st = rt = 0
        base = now - now % 5
        for k in range(180):
            t = base - (179 - k) * 5
            if 60 <= k < 75:        # a quiet stretch: no lookups, a gap in the hit rate
                pass
            else:
                r = random.randint(2000, 9000)
                req += r
                hit += int(r * (0.3 + 0.5 * (k / 180)))
                st += random.randint(0, 40) << 20
                rt += random.randint(0, 90) << 20
            history.append({"t": t, "l1_used_bytes": int(used * k / 179), "lookup_requested_tokens": req,
                            "lookup_hit_tokens": hit, "stored_bytes": st, "retrieved_bytes": rt})
        kinds = ["connect", "register", "disconnect", "unregister", "reap", "refusal"]
        nev = 100 if sc == "many" else 7
        events = []
        for k in range(nev):
            kind = kinds[k % len(kinds)]
            iid = hexid(k % max(1, len(instances)))
            events.append({"t": iso(now - (nev - k) * 37), "kind": kind, "instance": iid,
                           "text": "worker %s %s (pid %d uid 1000, kvlink-engine-sim)" % (iid, kind + "ed", 4000 + k)})
    last = history[-1] if history else {}
    return {
        "version": "0.1.0", "protocol_version": 4, "boot_id": "00a1b2c3d4e5f607",
        "started_at": iso(STARTED), "uptime_seconds": now - STARTED, "snapshot_age_seconds": 0.1,
        "ready": True, "draining": False,
        "listeners": ["unix:/run/kvlink/kvlink.sock", "tcp:127.0.0.1:7070"],
        "transfer_engine": "cpu (4 threads)",
        "l1": {"capacity_bytes": GIB, "used_bytes": used, "free_bytes": GIB - used, "pinned_bytes": used // 7,
               "wasted_bytes": 3 << 20, "chunks": used // 524288, "read_locks": 12, "write_locks": 3,
               "slab_bytes": 128 << 20, "slabs_total": 8, "slabs_free": 2, "layouts": 2, "huge_pages": False},
        "namespaces": namespaces, "tiers": tiers, "instances": instances,
        "jobs": 2, "sessions": 14, "transfers_in_flight": sum(i["transfers_in_flight"] for i in instances),
        "totals": {"lookup_requested_tokens": last.get("lookup_requested_tokens", 0),
                   "lookup_hit_tokens": last.get("lookup_hit_tokens", 0),
                   "stored_bytes": last.get("stored_bytes", 0), "retrieved_bytes": last.get("retrieved_bytes", 0),
                   "evictions": 17, "requests": 123456, "errors": 2, "instances_reaped": 1, "refusals": 1},
        "history": history, "events": events,
    }


answered = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def send(self, code, ctype, body, extra=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path in ("/", "/prefix/"):
            with open(args.page, "rb") as f:
                self.send(200, "text/html; charset=utf-8", f.read())
        elif path in ("/status", "/prefix/status"):
            if args.token and self.headers.get("Authorization") != "Bearer " + args.token:
                self.send(401, "text/plain", b"unauthorized\n", [("WWW-Authenticate", "Bearer")])
                return
            global answered
            if args.fail_after and answered >= args.fail_after:
                self.close_connection = True  # no answer at all: the fetch fails
                return
            answered += 1
            self.send(200, "application/json", json.dumps(status()).encode())
        else:
            self.send(404, "text/plain", b"not found\n")

    def log_message(self, fmt, *a):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
