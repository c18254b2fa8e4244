#!/usr/bin/python3
"""Browser test of kvlink-server's status page (lib/server/status_page.html,
served by the admin listener at "/").

  status_page_test.py --server BUILD/tools/kvlink-server \
      --engine-sim BUILD/tools/kvlink-engine-sim --out DIR
  status_page_test.py --mock --out DIR

The first form (meson test admin/status_page) runs the real kvlink-server
with --http on a free loopback port and kvlink-engine-sim against it, loads
the page in headless Chromium and reads the DOM the page's JavaScript built
(chromium --dump-dom with --virtual-time-budget: Chromium runs the page's
timers and waits for its fetches of "status" before it serialises the DOM;
body[data-updates] counts the page's successful fetches). It checks the
simulator's instances are shown connected with non-zero L1 usage, kills
the simulator, checks they are shown disconnected, and checks the bearer
token flow against a second server started with --auth-token-file.

The second form (meson test admin/status_page_mock) checks page behaviour a
real server does not easily produce (hundreds of instances, the server
vanishing under an open page, chart arithmetic on known history) against
mock_status_server.py.

Prints PASS/FAIL per check; exits 1 on any failure, 77 (skip) without
Chromium or when kvlink-server has no --http. Screenshots go to --out.
Every subprocess runs under a timeout; everything started is killed on exit.
"""
import argparse
import html.parser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_SOURCE = os.path.join(HERE, "..", "..", "lib", "server", "status_page.html")
SKIP = 77

results = []   # (ok, name)
procs = []     # Popen objects to kill at exit
tmp = None


def check(ok, name, detail=""):
    ok = bool(ok)
    results.append((ok, name))
    print(("PASS: " if ok else "FAIL: ") + name + ("" if ok or not detail else f" ({detail})"), flush=True)
    return ok


def note(msg):
    print("      " + msg, flush=True)


# ---- processes -------------------------------------------------------------

def start(cmd, log_name, env=None):
    log = open(os.path.join(tmp, log_name), "wb")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=env, start_new_session=True)
    p.log_path = log.name
    log.close()
    procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=10):
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    else:  # its children (a session of its own) may outlive it
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def log_tail(p, n=40):
    try:
        with open(p.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def run(cmd, timeout, **kw):
    """subprocess.run with a timeout that also kills the process's children."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=10)
        raise TimeoutError(f"{os.path.basename(cmd[0])} ran past {timeout} s") from None
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # helpers left behind (Chromium's zygotes)
        except (ProcessLookupError, PermissionError):
            pass
    return p.returncode, out, err


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, token=None, timeout=5):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def wait_for(what, fn, timeout, interval=0.2):
    """Calls fn until it returns something true; returns it, or None after timeout."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except (OSError, ValueError) as e:
            last_error = e
        time.sleep(interval)
    note(f"gave up waiting for {what} after {timeout} s" + (f" (last error: {last_error})" if last_error else ""))
    return None


# ---- Chromium --------------------------------------------------------------

def find_chromium():
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    def __init__(self, exe):
        self.exe = exe
        self.n = 0
        self.env = dict(os.environ, HOME=tmp, XDG_CONFIG_HOME=os.path.join(tmp, "xdg-config"),
                        XDG_CACHE_HOME=os.path.join(tmp, "xdg-cache"))

    def _cmd(self, budget_ms, extra, url):
        self.n += 1
        profile = os.path.join(tmp, f"chromium-profile-{self.n}")
        return [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
                "--hide-scrollbars", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}"] + extra + [url]

    def dom(self, url, budget_ms=6000, timeout=90):
        """The DOM after the page's scripts ran for budget_ms of virtual time."""
        rc, out, err = run(self._cmd(budget_ms, ["--dump-dom"], url), timeout, env=self.env)
        text = out.decode("utf-8", "replace")
        if rc != 0 or "<body" not in text:
            raise RuntimeError(f"chromium --dump-dom exited {rc}: {err.decode('utf-8', 'replace')[-2000:]}")
        return Dom(text)

    def screenshot(self, url, path, size="1280,900", budget_ms=6000, timeout=90):
        if os.path.exists(path):
            os.unlink(path)
        rc, out, err = run(self._cmd(budget_ms, [f"--screenshot={path}", f"--window-size={size}"], url),
                           timeout, env=self.env)
        ok = rc == 0 and os.path.exists(path) and os.path.getsize(path) > 0
        check(ok, f"screenshot saved: {path}", f"chromium exited {rc}: {err.decode('utf-8', 'replace')[-1000:]}")
        return ok


# ---- a small DOM from Chromium's serialisation ------------------------------

class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.walk()

    def find_all(self, pred):
        return [n for n in self.walk() if pred(n)]

    def visible(self):
        n = self
        while n is not None:
            if "hidden" in n.attrs:
                return False
            n = n.parent
        return True


class Dom(html.parser.HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.source = text
        self.root = Node("#document", {}, None)
        self.cur = self.root
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        n = Node(tag, attrs, self.cur)
        self.cur.children.append(n)
        if tag not in self.VOID:
            self.cur = n

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)

    def by_id(self, id_):
        found = self.root.find_all(lambda n: n.attrs.get("id") == id_)
        return found[0] if found else None

    def body(self):
        return self.root.find_all(lambda n: n.tag == "body")[0]

    def rows(self):
        """{instance id: (data-connected, [the text of each cell])}"""
        return {n.attrs["data-instance"]: (n.attrs.get("data-connected"),
                                           [" ".join(c.text().split()) for c in n.children
                                            if isinstance(c, Node) and c.tag == "td"])
                for n in self.root.find_all(lambda n: n.tag == "tr" and "data-instance" in n.attrs)}

    def describe(self):
        b = self.body().attrs
        err = self.by_id("error")
        return (f"data-state={b.get('data-state')} data-updates={b.get('data-updates')}"
                + (f" error banner: {err.text().strip()!r}" if err is not None and err.visible() else ""))


def page_ok(dom):
    b = dom.body().attrs
    return b.get("data-state") == "ok" and int(b.get("data-updates", "0")) >= 1


# ---- the real server ---------------------------------------------------------

def start_server(server, name, extra=()):
    port = free_port()
    sock = os.path.join(tmp, name + ".sock")
    p = start([server, "--listen", "unix:" + sock, "--http", f"127.0.0.1:{port}", "--l1-size", "256MiB",
               "--log-level", "info"] + list(extra), name + ".log")
    p.port, p.sock = port, sock
    base = f"http://127.0.0.1:{port}/"

    def up():
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}")
        return http_get(base + "healthz", timeout=2)[0] == 200

    try:
        ok = wait_for(f"{name}'s /healthz", up, 20)
    except RuntimeError as e:
        ok = False
        note(str(e))
    if not check(ok, f"{name} serves /healthz on 127.0.0.1:{port}", "log:\n" + log_tail(p)):
        return None
    return p


def real_test(a, browser):
    served_help = run([a.server, "--help"], 20)[1].decode("utf-8", "replace")
    if "--http" not in served_help:
        print(f"SKIP: {a.server} does not accept --http yet (its --help does not list it)")
        return SKIP

    srv = start_server(a.server, "server")
    if srv is None:
        return 1
    base = f"http://127.0.0.1:{srv.port}/"

    # The page: served without auth, the embedded copy of status_page.html, no data in it.
    code, ctype, body = http_get(base)
    with open(PAGE_SOURCE, "rb") as f:
        source = f.read()
    check(code == 200 and ctype.startswith("text/html"), "GET / answers 200 text/html", f"{code} {ctype!r}")
    check(body == source, "GET / is lib/server/status_page.html as built in",
          f"{len(body)} bytes served, {len(source)} in the source tree (rebuild?)")

    def status(token=None):
        code, _, body = http_get(base + "status", token)
        if code != 200:
            raise ValueError(f"/status answered {code}")
        return json.loads(body)

    # No engine yet: the page must cope with empty lists.
    dom = browser.dom(base)
    check(page_ok(dom), "page loads and fetches status (no engines yet)", dom.describe())
    check(not dom.rows(), "no instance rows before any engine connects", f"{len(dom.rows())} rows")
    empty = dom.by_id("instances-empty")
    check(empty is not None and empty.visible() and "No engine" in empty.text(),
          "the empty instance list says so", repr(empty.text() if empty is not None else None))

    # An engine: the simulator's worker and scheduler (both with its pid).
    sim = start([a.engine_sim, "--server", "unix:" + srv.sock, "--duration-s", "300", "--warmup-ms", "200",
                 "--rate", "50", "--log-level", "warn"], "engine-sim.log")

    def sim_busy():
        s = status()
        mine = [i for i in s.get("instances", []) if i.get("pid") == sim.pid and i.get("connected")]
        workers = [i for i in mine if i.get("registration")]
        if len(mine) >= 2 and workers and s["l1"]["used_bytes"] > 0 and len(s.get("history", [])) >= 2:
            return s
        if sim.poll() is not None:
            raise RuntimeError(f"kvlink-engine-sim exited with {sim.returncode}")
        return None

    try:
        s = wait_for("the simulator's instances, stored chunks and two history samples", sim_busy, 45, 0.5)
    except RuntimeError as e:
        s = None
        note(str(e))
    if not check(s is not None, "kvlink-engine-sim registers and stores (seen in /status)",
                 "sim log:\n" + log_tail(sim) + "\nserver log:\n" + log_tail(srv)):
        return 1
    sim_ids = sorted(i["id"] for i in s["instances"] if i.get("pid") == sim.pid)
    note(f"simulator pid {sim.pid}: instances {', '.join(sim_ids)}; L1 used {s['l1']['used_bytes']} bytes")

    dom = browser.dom(base)
    check(page_ok(dom), "page loads and fetches status (engine running)", dom.describe())
    note(f"the page's JavaScript fetched status {dom.body().attrs.get('data-updates')} times "
         "in 6 s of virtual time")
    rows = dom.rows()
    for iid in sim_ids:
        conn, cells = rows.get(iid, (None, []))
        check(conn == "true" and "connected" in cells, f"instance {iid} shown connected",
              f"row: {cells!r}" if iid in rows else f"no row; rows: {sorted(rows)}")
    worker_rows = [rows[i][1] for i in sim_ids if i in rows and "worker" in rows[i][1]]
    check(any("sim-model" in cells for cells in worker_rows), "the worker's registration (model) is shown",
          repr(worker_rows))
    used = dom.by_id("l1-used")
    used_bytes = int(used.attrs.get("data-bytes", "0")) if used is not None else 0
    check(used_bytes > 0 and not used.text().startswith("0 "), "L1 usage shown non-zero",
          f"l1-used: {used.text() if used is not None else None!r}")
    note(f"L1 shown: {used.text() if used is not None else ''} "
         f"({dom.by_id('l1-summary').text() if dom.by_id('l1-summary') is not None else ''})")
    chart = dom.by_id("chart-l1")
    check(chart is not None and int(chart.attrs.get("data-points", "0")) >= 2, "the L1 chart draws the history",
          f"data-points={chart.attrs.get('data-points') if chart is not None else None}")
    events = dom.root.find_all(lambda n: n.tag == "li" and n.attrs.get("data-kind"))
    check(any(e.attrs["data-kind"] == "connect" for e in events), "a connect event is listed",
          f"kinds: {[e.attrs['data-kind'] for e in events]}")
    browser.screenshot(base, os.path.join(a.out, "status_page_connected.png"))

    # The engine dies: its connections close at once, the server notices.
    stop(sim, signal.SIGKILL)
    note(f"killed kvlink-engine-sim (SIGKILL), exit status {sim.returncode}")

    # The worker stays listed, disconnected, for its KV-cache registration
    # (until reaped); the server may forget the scheduler at once.
    def all_gone():
        s = status()
        mine = [i for i in s.get("instances", []) if i["id"] in sim_ids]
        return s if mine and not any(i.get("connected") for i in mine) else None

    s = wait_for("the server to mark the simulator's instances disconnected", all_gone, 15)
    check(s is not None, "/status lists the simulator's worker as disconnected", "server log:\n" + log_tail(srv))
    listed = sorted(i["id"] for i in (s or {}).get("instances", []) if i["id"] in sim_ids)
    note(f"after the kill /status lists {', '.join(listed) or 'none'} of the simulator's instances")
    dom = browser.dom(base)
    check(page_ok(dom), "page reloads and fetches status (engine killed)", dom.describe())
    rows = dom.rows()
    for iid in sim_ids:
        conn, cells = rows.get(iid, (None, []))
        if iid in listed:
            check(conn == "false" and "disconnected" in cells, f"instance {iid} shown disconnected",
                  f"row: {cells!r}" if iid in rows else f"no row; rows: {sorted(rows)}")
        else:
            check(iid not in rows, f"instance {iid}, forgotten by the server, not shown", f"row: {cells!r}")
    browser.screenshot(base, os.path.join(a.out, "status_page_disconnected.png"))

    # A server with an auth token: the page asks for it, and takes #token=.
    token = "page-test-token-5f3a9c"
    token_file = os.path.join(tmp, "token")
    with open(token_file, "w") as f:
        f.write(token + "\n")
    os.chmod(token_file, 0o600)
    srv2 = start_server(a.server, "server-auth", ["--auth-token-file", token_file])
    if srv2 is None:
        return 1
    base2 = f"http://127.0.0.1:{srv2.port}/"
    check(http_get(base2)[0] == 200, "with a token, GET / is served without it")
    check(http_get(base2 + "status")[0] == 401, "with a token, GET /status without it answers 401")
    dom = browser.dom(base2, budget_ms=3000)
    form = dom.by_id("auth")
    check(dom.body().attrs.get("data-state") == "auth" and form is not None and form.visible(),
          "without a token the page shows the token form", dom.describe())
    dom = browser.dom(base2 + "#token=" + token)
    check(page_ok(dom), "with #token= in the URL the page shows the status", dom.describe())
    dom = browser.dom(base2 + "#token=wrong", budget_ms=3000)
    msg = dom.by_id("auth-message")
    check(dom.body().attrs.get("data-state") == "auth" and msg is not None and "rejected" in msg.text(),
          "a wrong token brings the form back, saying it was rejected", dom.describe())
    return 0


# ---- the mock ----------------------------------------------------------------

def mock_test(a, browser):
    def mock(*extra):
        port = free_port()
        p = start([sys.executable, os.path.join(HERE, "mock_status_server.py"), "--port", str(port)] + list(extra),
                  f"mock-{port}.log")
        base = f"http://127.0.0.1:{port}/"
        wait_for("the mock", lambda: http_get(base)[0] == 200, 10)
        return p, base

    p, base = mock("--scenario", "empty")
    dom = browser.dom(base)
    check(page_ok(dom), "empty: page loads", dom.describe())
    check(not dom.rows() and "No engine" in dom.by_id("instances-empty").text(), "empty: no rows, says so")
    check(dom.by_id("events-empty").visible() and not dom.root.find_all(lambda n: n.attrs.get("data-kind")),
          "empty: no events, says so")
    check(all(dom.by_id(c).attrs.get("data-points") == "0" for c in ("chart-l1", "chart-hit", "chart-tp")),
          "empty: charts drawn empty")
    check(dom.by_id("tiers-empty").visible() and "L1 only" in dom.by_id("tiers-empty").text(),
          "empty: no tier, says L1 only")
    stop(p)

    p, base = mock("--scenario", "full")
    dom = browser.dom(base + "prefix/")
    check(page_ok(dom), "full, behind a path prefix: page loads (relative status URL)", dom.describe())
    rows = dom.rows()
    check(len(rows) == 5 and sum(c == "false" for c, _ in rows.values()) == 1, "full: 5 rows, 1 disconnected",
          str(rows))
    pts = {c: dom.by_id(c).attrs.get("data-points") for c in ("chart-l1", "chart-hit", "chart-tp")}
    # 180 samples; 15 intervals without lookups or transfers are gaps in the hit rate.
    check(pts == {"chart-l1": "180", "chart-hit": "164", "chart-tp": "358"}, "full: chart points", str(pts))
    check("<script>alert" not in dom.source and "&lt;script&gt;alert(1)" in dom.source,
          "full: engine-supplied strings are text, not HTML")
    check(dom.by_id("l1-used").attrs.get("data-bytes", "0") != "0", "full: L1 used shown")
    tiers = {n.attrs.get("data-tier"): n.attrs.get("data-healthy")
             for n in dom.root.find_all(lambda n: n.tag == "tr" and "data-tier" in n.attrs)}
    nodes = {n.attrs.get("data-node"): n.attrs.get("data-healthy")
             for n in dom.root.find_all(lambda n: "data-node" in n.attrs)}
    check(tiers == {"disk": "true", "cluster": "true"}, "full: both tiers shown", str(tiers))
    check(nodes == {"10.0.0.0:6379": "true", "10.0.0.1:6379": "true", "10.0.0.2:6379": "false"},
          "full: the cluster's masters shown, the one down as down", str(nodes))
    browser.screenshot(base, os.path.join(a.out, "status_page_mock_narrow.png"), size="500,1800")
    stop(p)

    p, base = mock("--scenario", "many")
    dom = browser.dom(base)
    rows = dom.rows()
    conn = [n.attrs.get("data-connected") for n in dom.root.find_all(lambda n: n.tag == "tr" and "data-instance" in n.attrs)]
    check(page_ok(dom) and len(rows) == 400, "many: 400 instance rows", f"{len(rows)} rows; {dom.describe()}")
    check(conn == sorted(conn, reverse=True), "many: connected instances listed first")
    kinds = [n.attrs["data-kind"] for n in dom.root.find_all(lambda n: n.tag == "li" and n.attrs.get("data-kind"))]
    check(len(kinds) == 100 and kinds[0] == "unregister" and kinds[-1] == "connect", "many: 100 events, newest first",
          f"{len(kinds)} events, first {kinds[:1]}, last {kinds[-1:]}")
    stop(p)

    p, base = mock("--scenario", "full", "--fail-after", "1")
    dom = browser.dom(base)
    b, err, main = dom.body().attrs, dom.by_id("error"), dom.by_id("content")
    check(b.get("data-state") == "error" and b.get("data-updates") == "1" and err.visible()
          and "Cannot get" in err.text(), "server gone: error banner shown", dom.describe())
    check("stale" in main.attrs.get("class", "") and len(dom.rows()) == 5, "server gone: last data kept, greyed out")
    browser.screenshot(base, os.path.join(a.out, "status_page_mock_gone.png"))
    stop(p)

    p, base = mock("--scenario", "full", "--token", "s3cret")
    dom = browser.dom(base, budget_ms=3000)
    check(dom.body().attrs.get("data-state") == "auth" and dom.by_id("auth").visible() and not dom.rows(),
          "auth: token form shown, no data", dom.describe())
    dom = browser.dom(base + "#token=s3cret")
    check(page_ok(dom) and len(dom.rows()) == 5, "auth: #token= accepted", dom.describe())
    stop(p)
    return 0


def main():
    global tmp
    ap = argparse.ArgumentParser(description="browser test of kvlink-server's status page")
    ap.add_argument("--server", help="kvlink-server")
    ap.add_argument("--engine-sim", help="kvlink-engine-sim")
    ap.add_argument("--mock", action="store_true", help="check the page against mock_status_server.py")
    ap.add_argument("--out", default=".", help="directory for the screenshots")
    a = ap.parse_args()
    if not a.mock and not (a.server and a.engine_sim):
        ap.error("--server and --engine-sim are required (or --mock)")

    exe = find_chromium()
    if exe is None:
        print("SKIP: Chromium not found (install Debian's chromium: scripts/deps does)")
        return SKIP
    os.makedirs(a.out, exist_ok=True)
    a.out = os.path.abspath(a.out)
    tmp = tempfile.mkdtemp(prefix="kvlink-page-test-")
    rc = 1
    try:
        rc = (mock_test if a.mock else real_test)(a, Browser(exe))
    except Exception as e:  # a crash or a timeout is one more failure, with its reason
        check(False, f"test aborted: {type(e).__name__}: {e}")
    finally:
        for p in reversed(procs):
            stop(p, timeout=5)
        if any(not ok for ok, _ in results):
            for p in procs:
                print(f"---- {os.path.basename(p.log_path)} (last lines) ----\n{log_tail(p, 20)}")
        shutil.rmtree(tmp, ignore_errors=True)
    if rc == SKIP:
        return SKIP
    failed = [n for ok, n in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or rc or not results else 0


if __name__ == "__main__":
    sys.exit(main())
