#!/usr/bin/env bash
# Kills a build-uring bench-rpc that is still running 15 s after printing its summary (it hangs at exit).
while pgrep -f "measure.sh" >/dev/null; do
  for r in 1 2 3 4; do
    f=/tmp/uring-meas/logs/r$r-uring.bench-rpc.log
    [ -f $f ] || continue
    grep -q "^rc=" $f && continue
    if grep -q "separate runs tcp" $f; then
      sleep 15
      grep -q "^rc=" $f && continue
      pid=$(pgrep -f "^build-uring/bench/bench-rpc")
      [ -n "$pid" ] && { timeout 30 gdb -q -p $pid -batch -ex "thread apply all bt 8" > /tmp/uring-meas/hang-r$r.txt 2>&1; kill $pid; echo "killed $pid round $r" >> /tmp/uring-meas/watch.log; }
    fi
  done
  sleep 2
done
