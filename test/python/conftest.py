"""Fixtures shared by the Python tests: the real kvlink-server binary
($KVLINK_SERVER, set by meson test) on a unix socket in a temporary
directory, started, killed, stopped and restarted as tests need."""
import os
import select
import signal
import subprocess
import tempfile
import time

import pytest


class KvlinkServer:
    """One kvlink-server process on <tmp>/kvlink.sock. `args` are extra
    command-line arguments (e.g. ["--chunk-size", "16"])."""

    def __init__(self, binary, directory, args=()):
        self.binary = binary
        self.directory = directory
        self.args = list(args)
        self.socket_path = os.path.join(directory, "kvlink.sock")
        self.endpoint = "unix:" + self.socket_path
        self.log_path = os.path.join(directory, "server.log")
        self.proc = None
        self.ready_line = ""

    def start(self, timeout=10.0):
        """Starts the server and waits for its ready line."""
        assert self.proc is None, "server already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", self.endpoint, "--log-level", "info", *self.args],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
                for line in seen.decode(errors="replace").splitlines():
                    if line.startswith("kvlink-server ready"):
                        self.ready_line = line
                        return self
        out = seen.decode(errors="replace")
        self.kill()
        raise RuntimeError(f"kvlink-server did not print its ready line within {timeout} s; "
                           f"stdout: {out!r}; log: {self.log()!r}")

    def kill(self):
        """SIGKILL and reap (no-op if not running)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies too
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc = None

    def terminate(self, timeout=10.0):
        """SIGTERM (planned restart: the server drains); returns its exit code."""
        self.proc.terminate()
        code = self.proc.wait(timeout)
        self.proc.stdout.close()
        self.proc = None
        return code

    def stop_process(self):
        """SIGSTOP: the server hangs (its socket stays open, nothing answers)."""
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self):
        """SIGCONT after stop_process()."""
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout=10.0):
        self.kill()
        return self.start(timeout)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@pytest.fixture
def server_binary():
    path = os.environ.get("KVLINK_SERVER")
    if not path or not os.access(path, os.X_OK):
        pytest.fail("KVLINK_SERVER must name the kvlink-server binary (meson test sets it)")
    return path


@pytest.fixture
def server_factory(server_binary):
    """server_factory(args=()) -> a started KvlinkServer; every one is
    killed at the end of the test."""
    made = []
    with tempfile.TemporaryDirectory(prefix="kvlink-py-") as d:
        def make(args=(), start=True):
            sub = os.path.join(d, str(len(made)))
            os.mkdir(sub)
            s = KvlinkServer(server_binary, sub, args)
            made.append(s)
            return s.start() if start else s
        yield make
        for s in made:
            s.kill()


@pytest.fixture
def server(server_factory):
    """A started kvlink-server with 16-token chunks."""
    return server_factory(["--chunk-size", "16"])
