#!/usr/bin/env python3
"""Turns kvlink-engine-sim's JSON lines (and the demo's own "demo" lines)
into a timeline a person reads at a glance.

usage: kvlink-engine-sim ... | scripts/timeline.py [--origin-ms MS] [--expect-hits]

Health events: state transitions, notices and gate openings as they come;
"connected" events as one line saying whether the server holds the worker's
KV cache registration; "disconnected" events are left out (the degraded
line or the notice that comes with each says the same). A demo line with
"server_start": true marks when a server process was started: the worker's
next gate opening or recovery says how long after that it came.

Exit status: 0 when the simulator reported a summary with no verification
failures (and, with --expect-hits, some hits) and exited 0 (a
{"event":"sim_exit","rc":N} line, when given), and no {"event":"demo_error"}
line came; 1 otherwise.
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--origin-ms", type=int, default=0, help="time zero (ms since the epoch); default: first line")
    ap.add_argument("--expect-hits", action="store_true", help="fail when the summary reports no hit tokens")
    args = ap.parse_args()
    origin = args.origin_ms or None
    summary = None
    sim_rc = None
    errors = []
    hits_before = 0
    hits_ever = False
    hits_paused = False
    degraded = set()
    server_started_ms = None   # the latest server start the worker has not caught up with yet
    worker_acked = False       # the worker's registration was acknowledged once
    reregistering = False      # the worker's server does not hold its registration

    def say(ts, text):
        nonlocal origin
        if origin is None:
            origin = ts
        t = (ts - origin) / 1000.0 if ts else 0.0
        print(f"{t:6.1f}s  {text}", flush=True)

    def since_server_start(ts):
        nonlocal server_started_ms
        if server_started_ms is None or not ts:
            return ""
        text = f", {ts - server_started_ms} ms after the server started"
        server_started_ms = None
        return text

    for raw in sys.stdin:
        raw = raw.strip()
        if not raw:
            continue
        try:
            e = json.loads(raw)
        except json.JSONDecodeError:
            print(f"        {raw}", flush=True)  # not ours: pass it through
            continue
        ts = e.get("ts_ms", 0)
        ev = e.get("event")
        link = e.get("link", "")
        who = f"[{link}] " if link else ""
        if ev == "start":
            mib = e["kv_bytes"] / (1 << 20)
            say(ts, f"engine starts: {e['layers']} layers, {e['num_blocks']} blocks of {e['block_size']} tokens "
                    f"({mib:.0f} MiB KV cache in a memfd); model loading for {e['warmup_ms'] / 1000:.1f} s, gate closed")
        elif ev == "warmup_done":
            say(ts, f"warmup done: {e['pings_during_warmup']} heartbeat pings while the gate was closed")
        elif ev == "gate":
            extra = ""
            if link == "worker" and "register" in e["reason"]:
                worker_acked = True
                extra = since_server_start(ts)
            say(ts, f"{who}GATE OPENS ({e['reason']}{extra}): heartbeat starts")
        elif ev == "registered":
            worker_acked = True
            say(ts, f"KV cache registered (memfd passed to the server; chunk size {e['chunk_size']} tokens)")
        elif ev == "register_pending":
            say(ts, f"register_kv_caches: {e['error']} ({e['call_timeout_ms']} ms); the adapter keeps the "
                    f"registration for the server to come, requests go on meanwhile")
        elif ev == "connected":
            if link == "worker":
                holds = "yes" if e.get("registered") else "no"
                text = f"{who}connected to server boot {e['boot_id']}: server holds registration: {holds}"
                if not e.get("registered") and worker_acked:
                    reregistering = True
                    text += " -> registering the KV cache again"
            else:
                text = f"{who}connected to server boot {e['boot_id']}"
            if e.get("draining"):
                text += " (draining)"
            say(ts, text)
        elif ev == "disconnected":
            pass  # the degraded line or a notice says it
        elif ev == "state":
            to = e["to"]
            if to == "degraded":
                degraded.add(link)
                say(ts, f"{who}{e['from']} -> DEGRADED: {e['reason']}")
            elif to == "healthy" and e["from"] == "degraded":
                degraded.discard(link)
                extra = ""
                if link == "worker":
                    extra = "; KV cache RE-REGISTERED with the new server" if reregistering else \
                            "; the server kept the KV cache registration"
                    extra += since_server_start(ts)
                    reregistering = False
                say(ts, f"{who}RECOVERED -> HEALTHY after {e.get('outage_ms', 0):.0f} ms outage ({e['reason']}){extra}")
            elif to == "healthy":
                say(ts, f"{who}HEALTHY ({e['reason']})")
            else:
                reason = f": {e['reason']}" if e["reason"] != to else ""
                say(ts, f"{who}{e['from']} -> {to}{reason}")
        elif ev == "notice":
            say(ts, f"{who}{e['message']}")
        elif ev == "progress":
            new_hits = e["hit_tokens"] - hits_before
            hits_before = e["hit_tokens"]
            mark = ""
            if degraded:
                hits_paused = True
            elif new_hits > 0 and not hits_ever:
                hits_paused = False
                mark = "   <- first hits"
            elif new_hits > 0 and hits_paused:
                hits_paused = False
                mark = "   <- hits resuming"
            hits_ever = hits_ever or new_hits > 0
            say(ts, f"  requests {e['requests']:5d}  hit tokens +{new_hits:<6d} load-error blocks "
                    f"{e['load_error_blocks']:<4d} verify failures {e['verify_failures']}  "
                    f"(worker {e['worker']}, scheduler {e['scheduler']}){mark}")
        elif ev == "verify_failure":
            say(ts, f"!! VERIFY FAILURE request {e['request']} block {e['block']} token {e['token']} "
                    f"layer {e['layer']} plane {e['plane']}")
        elif ev == "summary":
            summary = e
            say(ts, "summary: " + ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("ts_ms", "event")))
        elif ev == "demo":
            if e.get("server_start"):
                server_started_ms = ts
            say(ts, f"== {e['message']}")
        elif ev == "sim_exit":
            sim_rc = e["rc"]
        elif ev == "demo_error":
            errors.append(e["message"])
            say(ts, f"!! {e['message']}")
        else:
            say(ts, raw)

    ok = True
    if summary is None:
        print("kvlink-engine-sim printed no summary", file=sys.stderr)
        ok = False
    elif summary["verify_failures"] > 0:
        print(f"FAILED: {summary['verify_failures']} retrieved blocks did not match what was stored", file=sys.stderr)
        ok = False
    elif args.expect_hits and summary["hit_tokens"] == 0:
        print("FAILED: no KV cache hit in the whole run (was the registration ever acknowledged?)", file=sys.stderr)
        ok = False
    for m in errors:
        print(f"FAILED: {m}", file=sys.stderr)
        ok = False
    if sim_rc not in (None, 0):
        print(f"kvlink-engine-sim exited with status {sim_rc}", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
