#!/usr/bin/env bash
# Alternates the two builds: epoll, io_uring, epoll, io_uring, ...
# Each turn: bench-rpc's ping_rtt benchmarks (bench/run's run, filtered; see the results file), then
# bench-health --only heartbeat_overhead (bench/run's full-mode parameters).
set -u
cd /work/uring
ROUNDS=${ROUNDS:-4}
LOG=/tmp/uring-meas/logs
mkdir -p $LOG
for r in $(seq 1 $ROUNDS); do
  for b in epoll uring; do
    d=build-$b
    export KVLINK_BUILD_DIR=$d KVLINK_SERVER=/work/uring/$d/tools/kvlink-server
    echo "$(date +%T) round $r $b bench-rpc" >&2
    timeout 240 $d/bench/bench-rpc "--benchmark_filter=^BM_(reference_ping_rtt|kvlink_ping_rtt|ping_rtt_paired)" > $LOG/r$r-$b.bench-rpc.log 2>&1; echo "rc=$?" >> $LOG/r$r-$b.bench-rpc.log
    echo "$(date +%T) round $r $b bench-health" >&2
    timeout 300 $d/bench/bench-health --only heartbeat_overhead > $LOG/r$r-$b.bench-health.log 2>&1; echo "rc=$?" >> $LOG/r$r-$b.bench-health.log
    cat /proc/loadavg >> $LOG/r$r-$b.bench-health.log
  done
done
echo "$(date +%T) done" >&2
