#!/usr/bin/env python3
"""Turns kvlink-engine-sim's JSON lines (and the demo's own "demo" lines)
into a timeline a person reads at a glance.

usage: kvlink-engine-sim ... | scripts/timeline.py [--origin-ms MS]

Exit status: 0 when the simulator reported a summary with no verification
failures and exited 0 (a {"event":"sim_exit","rc":N} line, when given);
1 otherwise.
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--origin-ms", type=int, default=0, help="time zero (ms since the epoch); default: first line")
    args = ap.parse_args()
    origin = args.origin_ms or None
    summary = None
    sim_rc = None
    hits_before = 0
    hits_paused = False
    degraded = set()

    def say(ts, text):
        nonlocal origin
        if origin is None:
            origin = ts
        t = (ts - origin) / 1000.0 if ts else 0.0
        print(f"{t:6.1f}s  {text}", flush=True)

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
            say(ts, f"{who}GATE OPENS ({e['reason']}): heartbeat starts")
        elif ev == "registered":
            say(ts, f"KV cache registered (memfd passed to the server; chunk size {e['chunk_size']} tokens)")
        elif ev == "state":
            to = e["to"]
            if to == "degraded":
                degraded.add(link)
                say(ts, f"{who}{e['from']} -> DEGRADED: {e['reason']}")
            elif to == "healthy" and e["from"] == "degraded":
                degraded.discard(link)
                say(ts, f"{who}RECOVERED -> HEALTHY after {e.get('outage_ms', 0):.0f} ms outage ({e['reason']})")
            elif to == "healthy":
                say(ts, f"{who}HEALTHY ({e['reason']})")
            else:
                say(ts, f"{who}{e['from']} -> {to}")
        elif ev == "notice":
            msg = e["message"]
            if msg.startswith("re-registered") and link == "worker":
                msg = "RE-REGISTERED its KV cache with the new server"
            say(ts, f"{who}{msg}")
        elif ev == "progress":
            new_hits = e["hit_tokens"] - hits_before
            hits_before = e["hit_tokens"]
            mark = ""
            if degraded:
                hits_paused = True
            elif new_hits > 0 and hits_paused:
                hits_paused = False
                mark = "   <- hits resuming"
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
            say(ts, f"== {e['message']}")
        elif ev == "sim_exit":
            sim_rc = e["rc"]
        else:
            say(ts, raw)

    ok = True
    if summary is None:
        print("kvlink-engine-sim printed no summary", file=sys.stderr)
        ok = False
    elif summary["verify_failures"] > 0:
        print(f"FAILED: {summary['verify_failures']} retrieved blocks did not match what was stored", file=sys.stderr)
        ok = False
    if sim_rc not in (None, 0):
        print(f"kvlink-engine-sim exited with status {sim_rc}", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
