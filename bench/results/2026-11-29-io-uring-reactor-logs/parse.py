import re, glob, statistics as st, os, sys
LOG = sys.argv[1] if len(sys.argv) > 1 else "/tmp/uring-meas/logs"
builds = ("epoll", "uring")
data = {b: {} for b in builds}
def put(b, k, v): data[b].setdefault(k, []).append(v)
rounds = sorted({int(re.match(r"r(\d+)-", os.path.basename(p)).group(1)) for p in glob.glob(LOG + "/r*-*.log")})
for r in rounds:
    for b in builds:
        try: rpc = open(f"{LOG}/r{r}-{b}.bench-rpc.log").read()
        except FileNotFoundError: continue
        for tr in ("unix", "tcp"):
            for cpus in ("1 cpu", "2 cpus"):
                m = re.search(rf"ping_rtt {tr}, {cpus}: kvlink p50 ([\d.]+) us \(p99 ([\d.]+) us\), reference p50 ([\d.]+) us, "
                              rf"ratio ([\d.]+).*?\[paired, median of (\d+) runs; ratios ([\d.]+)\.\.([\d.]+)\]", rpc)
                if m:
                    put(b, f"ping_rtt {tr}, {cpus}: kvlink p50 us", float(m.group(1)))
                    put(b, f"ping_rtt {tr}, {cpus}: kvlink p99 us", float(m.group(2)))
                    put(b, f"ping_rtt {tr}, {cpus}: reference p50 us", float(m.group(3)))
                    put(b, f"ping_rtt {tr}, {cpus}: ratio to reference", float(m.group(4)))
        try: h = open(f"{LOG}/r{r}-{b}.bench-health.log").read()
        except FileNotFoundError: continue
        m = re.search(r"heartbeat_overhead \| 1000 monitors: ([\d.]+) % of one core, (\d+) pings/s, (\d+) failed pings; ([\d.]+) KiB RSS per monitor \| "
                      r"idle process ([\d.]+) %; blocking ping-pong ([\d.]+) us CPU per round trip = ([\d.]+) % at this rate \(ratio ([\d.]+)\)", h)
        if m:
            put(b, "heartbeat_overhead: % of one core", float(m.group(1)))
            put(b, "heartbeat_overhead: pings/s", float(m.group(2)))
            put(b, "heartbeat_overhead: failed pings", float(m.group(3)))
            put(b, "heartbeat_overhead: KiB RSS per monitor", float(m.group(4)))
            put(b, "heartbeat_overhead: idle process %", float(m.group(5)))
            put(b, "heartbeat_overhead: ref us CPU per blocking round trip", float(m.group(6)))
            put(b, "heartbeat_overhead: ratio to blocking round trips", float(m.group(8)))
            put(b, "heartbeat_overhead: us CPU per ping", float(m.group(1)) * 1e4 / float(m.group(2)))
keys = list(dict.fromkeys(list(data["epoll"]) + list(data["uring"])))
print("| figure | epoll median (min..max) | io_uring median (min..max) | io_uring/epoll | n |")
print("|---|---|---|---|---|")
for k in keys:
    e, u = data["epoll"].get(k, []), data["uring"].get(k, [])
    def f(v): return f"{st.median(v):.2f} ({min(v):.2f}..{max(v):.2f})" if v else "-"
    ratio = f"{st.median(u)/st.median(e):.2f}" if e and u and st.median(e) else "-"
    print(f"| {k} | {f(e)} | {f(u)} | {ratio} | {len(e)}/{len(u)} |")
print()
for b in builds:
    for k in keys:
        print(b, k, data[b].get(k))
