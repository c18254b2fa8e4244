#!/usr/bin/python3
"""python_lookup and python_ping (PERF.md, "Engines and operators"): the
kvlink Python package against C++ making the same calls, in one run.

    bench/python.py [--build-dir build] [--samples 2000] [--rounds 5]

Starts kvlink-server on a unix socket; then, alternating per round, the C++
reference (bench-python-ref) and this process measure
  lookup: one SYNC_LOOKUP round trip of one 256-token chunk; Python with
          `await sched.async_submit_lookup(...)` on asyncio, C++ with the
          blocking submit_lookup;
  ping:   one PING round trip; Python's blocking `sched.ping()`, C++ the same
          call on the connection with a future.
Prints the median over rounds of each side's p50, and the ratio, as
  python_lookup <py us> <cpp us> <ratio>
  python_ping <py us> <cpp us> <ratio>
"""
import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def p50(samples):
    return statistics.median(samples) * 1e6


def python_round(sched, samples):
    tokens = list(range(1, 257))

    async def lookups():
        out = []
        for i in range(samples + samples // 10):
            rid = f"py-{time.monotonic_ns()}-{i}"
            start = time.perf_counter()
            await sched.async_submit_lookup(rid, tokens)
            took = time.perf_counter() - start
            sched.cleanup(rid)
            if i >= samples // 10:
                out.append(took)
        return out

    lookup = asyncio.run(lookups())
    ping = []
    for i in range(samples + samples // 10):
        start = time.perf_counter()
        sched.ping()
        if i >= samples // 10:
            ping.append(time.perf_counter() - start)
    return p50(lookup), p50(ping)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.environ.get("KVLINK_BUILD_DIR", "build"))
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    build = os.path.join(ROOT, args.build_dir)
    sys.path.insert(0, os.path.join(build, "python"))
    import kvlink

    with tempfile.TemporaryDirectory(prefix="kvlink-bench-py-") as d:
        endpoint = f"unix:{d}/kvlink.sock"
        server = subprocess.Popen([os.path.join(build, "tools", "kvlink-server"), "--listen", endpoint,
                                   "--log-level", "warn"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            if "ready" not in server.stdout.readline().decode():
                raise SystemExit("bench/python.py: kvlink-server did not start")
            rt = kvlink.Runtime()
            sched = kvlink.SchedulerAdapter(rt, kvlink.SchedulerConfig(
                endpoint=endpoint, model="bench", lookup_mode=kvlink.LookupMode.sync))
            sched.ready()
            deadline = time.monotonic() + 5
            while sched.chunk_size == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            py_lookup, py_ping, cpp_lookup, cpp_ping = [], [], [], []
            for _ in range(args.rounds):
                out = subprocess.run([os.path.join(build, "bench", "bench-python-ref"), endpoint, str(args.samples)],
                                     capture_output=True, text=True, check=True, timeout=300).stdout
                figures = dict(line.split() for line in out.splitlines())
                cpp_lookup.append(float(figures["lookup_p50_us"]))
                cpp_ping.append(float(figures["ping_p50_us"]))
                lookup, ping = python_round(sched, args.samples)
                py_lookup.append(lookup)
                py_ping.append(ping)
            sched.stop()
            rt.stop()
        finally:
            server.kill()
            server.wait()
    for name, py, cpp in (("python_lookup", py_lookup, cpp_lookup), ("python_ping", py_ping, cpp_ping)):
        a, b = statistics.median(py), statistics.median(cpp)
        print(f"{name} {a:.2f} {b:.2f} {a / b:.3f}")


if __name__ == "__main__":
    main()
