"""Sums test results from meson's testlog.json files into one line:
   tests: N passed, N failed[, N skipped]
A doctest binary counts its test cases; a pytest run its cases, read from
the JUnit XML its command line names (--junitxml=); any other test counts
once. A test
that failed although doctest reported no failing case (a crash, a timeout)
adds one failure. Prints the failing tests' output, exits 1 on any failure.

A binary run once per source file (doctest -sf=..., one meson test each)
reports the other files' cases as skipped in every run: its runs are
summed, and its skipped cases are the ones no run passed or failed (the
doctest::skip ones, e.g. GPU cases without a GPU)."""
import json
import re
import sys
import xml.etree.ElementTree as ElementTree

DOCTEST = re.compile(r"test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed\s*\|\s*(\d+) skipped")



def junit_counts(path):
    """(passed, failed, skipped) of the test cases in a JUnit XML file."""
    passed = failed = skipped = 0
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            failed += 1
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped


build_failed = sys.argv[1] == "1"
passed = failed = skipped = 0
per_file_runs = {}  # binary -> [its test cases, passed, failed] over its runs
for path in sys.argv[2:]:
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        print(f"count_tests: cannot read {path}: {e}")
        failed += 1
        continue
    for line in lines:
        t = json.loads(line)
        out = t.get("stdout", "") or ""
        ok = t["result"] == "OK"
        m = DOCTEST.findall(out)
        command = t.get("command") or []
        by_file = any(a.startswith("-sf=") for a in command[1:])
        junit = [a.split("=", 1)[1] for a in command[1:] if a.startswith("--junitxml=")]
        if junit:
            try:
                p, f, s = junit_counts(junit[0])
            except (OSError, ElementTree.ParseError) as e:  # it crashed before writing its report
                p, f, s = 0, 1, 0
                out += f"\ncount_tests: no pytest report {junit[0]}: {e}"
            passed, failed, skipped = passed + p, failed + f, skipped + s
            if not ok and t["result"] != "SKIP" and f == 0:
                failed += 1
        elif m and by_file:
            n, p, f, s = map(int, m[-1])  # n: the cases the filter ran; s: the rest
            g = per_file_runs.setdefault(command[0], [n + s, 0, 0])
            g[1], g[2] = g[1] + p, g[2] + f
            if not ok and f == 0:
                failed += 1
        elif m:
            _, p, f, s = map(int, m[-1])
            passed, failed, skipped = passed + p, failed + f, skipped + s
            if not ok and f == 0:
                failed += 1
        elif t["result"] == "SKIP":
            skipped += 1
        elif ok:
            passed += 1
        else:
            failed += 1
        if not ok and t["result"] != "SKIP":
            print(f"---- {t['name']}: {t['result']} ----")
            print(out[-6000:])
            print((t.get("stderr", "") or "")[-3000:])

for total, p, f in per_file_runs.values():
    passed, failed, skipped = passed + p, failed + f, skipped + max(total - p - f, 0)
if build_failed:
    failed += 1
line = f"tests: {passed} passed, {failed} failed"
if skipped:
    line += f", {skipped} skipped"
print(line)
sys.exit(1 if failed or passed == 0 else 0)
