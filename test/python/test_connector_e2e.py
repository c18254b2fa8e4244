"""The connector core (kvlink.connector) against the real kvlink-server.

`MiniVllm` replays vLLM's call order with plain ids, tokens and block ids:
the scheduler's lookups, allocation, async loads (WAITING_FOR_REMOTE_KVS),
preemption, aborts and block freeing, and the worker's bind / start_load_kv
/ forward / wait_for_save / get_finished on a real KV cache (torch CPU
tensors over a memfd the server maps). The "forward pass" writes each
token's KV as a pattern of the token ids up to it, the layer and the
plane; every block loaded from the server is compared with that pattern,
and a block the retrieve should fill is poisoned first.
"""
import json
import math
import os
import subprocess
import time

import pytest

import kvlink
from kvlink.connector import CachedRequest, ConnectorSettings, NewRequest, SchedulerCore, SchedulerStep, WorkerCore

torch = pytest.importorskip("torch", reason="the KV cache is viewed through torch tensors (Debian: python3-torch)")

BS = 16            # vLLM block size
CHUNK = 32         # two blocks per chunk
LAYERS, HEADS, HEAD = 2, 2, 8  # 32 tokens x 2 layers x 2 planes x 2 heads x 8 x 2 bytes = the server's 4 KiB minimum
SERVER_ARGS = ["--chunk-size", str(CHUNK)]
FAST = dict(health_interval_s=0.05, ping_timeout_s=0.1, connect_timeout_s=0.2, reconnect_max_s=0.05,
            call_timeout_s=0.5, transfer_timeout_s=0.5)
STEP_S = 0.002     # an engine step


def prompt(seed, n):
    """n token ids, a different sequence per seed."""
    return [(seed * 7919 + i * 104729) % 30000 + 1 for i in range(n)]


class Req:
    def __init__(self, rid, tokens, max_tokens, local_tokens=0):
        self.rid, self.prompt, self.max_tokens = rid, list(tokens), max_tokens
        self.local_tokens = local_tokens  # vLLM's own prefix-cache hit (block aligned), first time only
        self.outputs = []
        self.status = "waiting"           # waiting, loading, running, finished
        self.blocks = []
        self.num_computed = 0
        self.resumed = False              # preempted: the next schedule is a resume
        self.load = None                  # (first, end) tokens of the async load in flight
        self.loaded_tokens = 0            # tokens that came from the server, verified

    @property
    def tokens(self):
        return self.prompt + self.outputs


class MiniVllm:
    """One vLLM engine: a scheduler core and one worker core, each with a
    kvlink runtime of its own as if in their own processes."""

    def __init__(self, endpoint, num_blocks=64, repeat_finished_after=0, **extra):
        self.settings = ConnectorSettings.from_extra_config(
            {"endpoint": endpoint, "chunk_size": CHUNK, **FAST, **extra}, block_size=BS, model="e2e-model")
        self.rt_s, self.rt_w = kvlink.Runtime(), kvlink.Runtime()
        self.s_adapter = kvlink.SchedulerAdapter(self.rt_s, self.settings.scheduler_config())
        self.w_adapter = kvlink.WorkerAdapter(self.rt_w, self.settings.worker_config())
        self.sched = SchedulerCore(self.s_adapter, self.rt_s, self.settings, BS)
        self.worker = WorkerCore(self.w_adapter, self.rt_w, self.settings)
        self.cache = kvlink.CpuKvCache(kvlink.paged_layout(LAYERS, num_blocks, BS, HEADS, HEAD, 2))
        self.kv = [t.view(torch.int16) for t in self.cache.torch_layers(torch.float16)]
        self.worker.register_kv_caches(self.cache.layout, self.cache.fd)
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks))
        self.reqs, self.waiting, self.running = {}, [], []
        # vLLM's finished ids for the next get_finished; with
        # repeat_finished_after=k each is given again k steps later (the
        # repeats async scheduling makes).
        self.repeat_finished_after = repeat_finished_after
        self.finished_next, self.repeats = set(), {}
        self.held = {}             # finished, blocks held until finished_sending
        self.loading_aborted = {}  # aborted while loading: blocks freed at finished_recving
        self.recv_done, self.failed_recv = set(), set()
        self.preempt_next = set()
        self.sent, self.received = [], []  # every finished_sending / finished_recving id, in order
        self.failures = []         # broken vLLM invariants and wrong bytes
        self.load_error_blocks = 0
        self.before_worker = None  # fn(plan) between the scheduler's and the worker's part of a step
        self.steps = 0

    # ---- the engine's API ----------------------------------------------------------

    def add(self, rid, tokens, max_tokens=2, local_tokens=0):
        assert rid not in self.reqs, f"{rid} still known to the engine"
        r = Req(rid, tokens, max_tokens, local_tokens)
        self.reqs[rid] = r
        self.waiting.append(r)
        return r

    def abort(self, rid):
        """vLLM's finish_requests(rid, FINISHED_ABORTED)."""
        r = self.reqs[rid]
        delay = False
        if r.status == "loading":
            delay = rid not in self.recv_done
            self.recv_done.discard(rid)
            self.failed_recv.discard(rid)
            self.waiting.remove(r)
        elif r.status == "running":
            self.running.remove(r)
        else:
            self.waiting.remove(r)
        self._finish(r, delay_free=delay)

    def run(self, until, timeout=8.0):
        """Steps until until() is true; fails after timeout (a stuck request)."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"stuck: {self.state()}"
            self.step()
            time.sleep(STEP_S)
        assert not self.failures, self.failures

    def run_all(self, timeout=8.0):
        """Until every request finished and every block is free again."""
        self.run(lambda: not self.reqs and len(self.free) == self.num_blocks, timeout)

    def state(self):
        return {rid: (r.status, r.num_computed, len(r.blocks)) for rid, r in self.reqs.items()} | {
            "held": sorted(self.held), "loading_aborted": sorted(self.loading_aborted), "free": len(self.free)}

    def shutdown(self):
        if self.rt_w.stopped:
            return
        self.worker.shutdown()
        self.sched.shutdown()
        self.rt_w.stop()
        self.rt_s.stop()

    # ---- one step, in vLLM's order ----------------------------------------------------

    def step(self):
        self.steps += 1
        new, cached, scheduled = [], [], {}
        preempted, self.preempt_next = set(self.preempt_next), set()
        for rid in preempted:
            self._preempt(self.reqs[rid])
        budget = 512
        for r in list(self.running):  # running requests first
            n = min(len(r.tokens) - r.num_computed, budget)
            blocks = self._alloc(math.ceil((r.num_computed + n) / BS) - len(r.blocks))
            if n <= 0 or blocks is None:
                continue
            r.blocks += blocks
            cached.append(CachedRequest(r.rid, blocks, r.num_computed, n))
            scheduled[r.rid] = n
            budget -= n
        for r in list(self.waiting):
            if budget <= 0:
                break
            if r.status == "loading":
                if r.rid not in self.recv_done:
                    continue  # still WAITING_FOR_REMOTE_KVS
                self._load_done(r)
            ext, is_async, local = 0, False, 0
            if r.num_computed == 0:
                local = self._local_hit(r)
                ext, is_async = self.sched.get_num_new_matched_tokens(r.rid, r.tokens, local)
                if ext is None:
                    continue  # lookup still running
                if ext > 0:
                    assert is_async and (local + ext) % CHUNK == 0, (r.rid, local, ext, is_async)
            if is_async:
                blocks = self._alloc(math.ceil((local + ext) / BS) - len(r.blocks))
                if blocks is None:
                    break
                r.blocks += blocks
                self.sched.update_state_after_alloc(r.rid, list(r.blocks), ext)
                r.load = (local, local + ext)
                self._poison(r.blocks[local // BS:(local + ext) // BS])
                r.status = "loading"
                continue
            computed = r.num_computed or local
            n = min(len(r.tokens) - computed, budget)
            blocks = self._alloc(math.ceil((computed + n) / BS) - len(r.blocks))
            if blocks is None:
                break
            r.blocks += blocks
            self.sched.update_state_after_alloc(r.rid, list(r.blocks), 0)
            r.num_computed, r.status = computed, "running"
            self.waiting.remove(r)
            self.running.append(r)
            if r.resumed:
                cached.append(CachedRequest(r.rid, list(r.blocks), computed, n, resumed=True))
            else:
                new.append(NewRequest(r.rid, r.prompt, list(r.blocks), computed, n))
            r.resumed = False
            scheduled[r.rid] = n
            budget -= n
        plan = self.sched.build_connector_meta(SchedulerStep(new, cached, preempted_ids=preempted))
        finished, self.finished_next = self.finished_next | self.repeats.pop(self.steps, set()), set()
        if self.repeat_finished_after and finished:
            self.repeats.setdefault(self.steps + self.repeat_finished_after, set()).update(finished)

        # The worker: the plan crossed to its process.
        if self.before_worker:
            self.before_worker(plan)
        self.worker.bind(plan)
        self.worker.handle_preemptions(plan.preempted_ids)
        self.worker.start_load_kv()
        for rid, n in scheduled.items():  # the forward pass
            r = self.reqs[rid]
            self._write(r, r.num_computed, r.num_computed + n)
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(finished)
        invalid = self.worker.get_block_ids_with_load_errors()

        # The scheduler: update_from_output.
        self._invalid_blocks(invalid)
        for rid, n in scheduled.items():
            r = self.reqs[rid]
            r.num_computed += n
            if r.num_computed >= len(r.tokens):  # sampled a token
                r.outputs.append(40000 + len(r.outputs))
                if len(r.outputs) >= r.max_tokens:
                    self.running.remove(r)
                    self._finish(r)
        for rid in recving or ():
            self.received.append(rid)
            r = self.reqs.get(rid)
            if r is None:
                self.failures.append(f"finished_recving for unknown {rid}")
            elif r.status == "loading":
                self._verify_load(r, invalid)
                self.recv_done.add(rid)
            elif rid in self.loading_aborted:
                self._release(rid, self.loading_aborted.pop(rid))
            else:
                self.failures.append(f"finished_recving for {rid} in state {r.status}")
        for rid in sending or ():
            self.sent.append(rid)
            if rid not in self.held:  # vLLM asserts here
                self.failures.append(f"finished_sending for {rid}, whose blocks are not held for it")
            else:
                self._release(rid, self.held.pop(rid))

    # ---- scheduler details ---------------------------------------------------------

    def _alloc(self, n):
        if n <= 0:
            return []
        if len(self.free) < n:
            return None
        got, self.free = self.free[:n], self.free[n:]
        return got

    def _release(self, rid, blocks):
        self.free.extend(blocks)
        if self.reqs.get(rid) is not None and self.reqs[rid].status == "finished":
            del self.reqs[rid]

    def _local_hit(self, r):
        """vLLM's own prefix cache: its blocks already hold the tokens."""
        if r.local_tokens and not r.blocks:
            r.blocks = self._alloc(r.local_tokens // BS)
            self._write(r, 0, r.local_tokens)
        return r.local_tokens

    def _preempt(self, r):
        self.running.remove(r)
        self.free.extend(r.blocks)
        r.blocks, r.num_computed, r.status, r.resumed, r.local_tokens = [], 0, "waiting", True, 0
        self.waiting.insert(0, r)

    def _finish(self, r, delay_free=False):
        r.status = "finished"
        self.finished_next.add(r.rid)
        if self.sched.request_finished(r.rid):
            self.held[r.rid] = r.blocks
        elif delay_free:
            self.loading_aborted[r.rid] = r.blocks
        else:
            self._release(r.rid, r.blocks)
        r.blocks = []

    def _invalid_blocks(self, invalid):
        """vLLM's recompute policy: a loading request restarts at its first failed block."""
        if not invalid:
            return
        self.load_error_blocks += len(invalid)
        for r in self.waiting:
            if r.status != "loading":
                continue
            first, end = r.load
            for i in range(first // BS, math.ceil(end / BS)):
                if r.blocks[i] in invalid:
                    r.num_computed = i * BS
                    self.failed_recv.add(r.rid)
                    break

    def _load_done(self, r):
        """vLLM's _update_waiting_for_remote_kv."""
        self.recv_done.discard(r.rid)
        if r.rid in self.failed_recv:
            self.failed_recv.discard(r.rid)
            if r.num_computed == 0:
                self.free.extend(r.blocks)
                r.blocks, r.local_tokens = [], 0
        else:
            n = min(len(r.blocks) * BS, len(r.tokens))
            r.num_computed = n - 1 if n == len(r.tokens) else n
        r.status = "waiting"

    # ---- the KV cache ----------------------------------------------------------------

    def _pattern(self, tokens, first, end, layer, plane):
        """[end - first, HEADS, HEAD] int16 values of positions first..end-1:
        a function of every token up to the position, the layer and plane."""
        h, hs = 0, []
        for t in tokens[:end]:
            h = (h * 1000003 + t) % 2147483647
            hs.append(h)
        pos = torch.tensor(hs[first:end], dtype=torch.int64)[:, None]
        lane = torch.arange(HEADS * HEAD, dtype=torch.int64)[None, :]
        v = (pos * 31 + layer * 7919 + plane * 104729 + lane * 131) % 32749
        return v.to(torch.int16).view(end - first, HEADS, HEAD)

    def _write(self, r, first, end):
        for b in range(first // BS, math.ceil(end / BS)):
            lo, hi = max(first, b * BS), min(end, (b + 1) * BS)
            for layer in range(LAYERS):
                for plane in range(2):
                    self.kv[layer][plane, r.blocks[b], lo - b * BS:hi - b * BS] = \
                        self._pattern(r.tokens, lo, hi, layer, plane)

    def _poison(self, blocks):
        for layer in range(LAYERS):
            for b in blocks:
                self.kv[layer][:, b] = -1  # no pattern value is negative

    def _verify_load(self, r, invalid):
        """Every byte of every block loaded, up to the first failed one."""
        first, end = r.load
        for i in range(first // BS, math.ceil(end / BS)):
            if r.blocks[i] in invalid:
                return
            lo, hi = max(first, i * BS), min(end, (i + 1) * BS)
            for layer in range(LAYERS):
                for plane in range(2):
                    got = self.kv[layer][plane, r.blocks[i], lo - i * BS:hi - i * BS]
                    if not torch.equal(got, self._pattern(r.tokens, lo, hi, layer, plane)):
                        self.failures.append(f"{r.rid}: block {i} (engine block {r.blocks[i]}) layer {layer} "
                                             f"plane {plane} differs from what was stored")
                        return
            r.loaded_tokens += hi - lo


@pytest.fixture
def engines():
    made = []

    def make(*args, **kw):
        e = MiniVllm(*args, **kw)
        made.append(e)
        return e
    yield make
    for e in made:
        e.shutdown()


def wait_until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def server_stats(srv):
    """kvlink-server's counters and gauges (kvlink-cli stats, built next to the server)."""
    cli = os.path.join(os.path.dirname(srv.binary), "kvlink-cli")
    out = subprocess.run([cli, "stats", "--server", srv.endpoint], check=True, capture_output=True, timeout=10)
    return json.loads(out.stdout)


def no_locks_left(srv):
    """Every request's session ended and its lookup locks went with it."""
    st = server_stats(srv)
    return st["sessions"] == 0 and st["read_locks_held"] == 0


def once(when, action):
    """A before_worker hook: action() the first time when(plan) holds."""
    fired = []

    def hook(plan):
        if not fired and when(plan):
            fired.append(1)
            action()
    return hook


def healthy(e):
    return e.s_adapter.state == kvlink.State.healthy and e.w_adapter.state == kvlink.State.healthy


def serve(e, rid, tokens, **kw):
    """One request from start to its blocks being free again."""
    r = e.add(rid, tokens, **kw)
    e.run_all()
    return r


# ---- scenarios ------------------------------------------------------------------------


def test_prefix_hit_loads_every_chunk_and_bytes_match(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    p = prompt(1, 100)  # 3 full chunks and 4 tokens
    a = serve(e, "a", p)
    assert a.loaded_tokens == 0 and e.sent == ["a"]  # a stored its chunks; its blocks waited for that
    b = serve(e, "b", p)
    assert b.loaded_tokens == 96 and e.received == ["b"] and e.load_error_blocks == 0
    # A prompt of whole chunks: all of it loads, vLLM recomputes the last token.
    c = serve(e, "c", p[:96])
    assert c.loaded_tokens == 96
    assert e.s_adapter.metrics()["lookup_hit_tokens"] == 192
    assert e.w_adapter.metrics()["retrieved_chunks"] == 6
    wait_until(lambda: no_locks_left(srv))


def test_partial_hit_loads_the_shared_chunks_and_stores_the_rest(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    shared = prompt(2, 64)
    serve(e, "a", shared + prompt(3, 40))
    b = serve(e, "b", shared + prompt(4, 40))  # 2 chunks shared, the third differs
    assert b.loaded_tokens == 64
    c = serve(e, "c", shared + prompt(4, 40))  # b stored its third chunk
    assert c.loaded_tokens == 96
    # vLLM's own prefix cache holds one block: the load skips it.
    d = serve(e, "d", shared + prompt(4, 40), local_tokens=16)
    assert d.loaded_tokens == 80
    wait_until(lambda: no_locks_left(srv))


def test_miss_computes_and_stores(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    a = serve(e, "a", prompt(5, 70))
    assert a.loaded_tokens == 0 and e.received == [] and e.sent == ["a"]
    short = serve(e, "short", prompt(6, 20))  # no full chunk: nothing to store, nothing held
    assert short.loaded_tokens == 0 and e.sent == ["a"]
    assert e.w_adapter.metrics()["stored_chunks"] == 2


def test_preemption_and_reload_under_the_same_id(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    p = prompt(7, 100)
    r = e.add("r", p, max_tokens=6)
    # Prefill done and its chunks stored (a lookup racing the store would
    # rightly miss what is still being written).
    e.run(lambda: r.outputs and e.w_adapter.metrics()["stored_chunks"] == 3)
    e.preempt_next.add("r")
    e.run(lambda: r.loaded_tokens > 0)  # looked up again, loaded its own chunks into new blocks
    assert r.loaded_tokens == 96
    e.run_all()
    assert len(r.outputs) == 6 and e.sent == []  # its stores read the old blocks, awaited at preemption
    again = serve(e, "r", p)  # the same id, a new request: loaded and reported again
    assert again.loaded_tokens == 96 and e.received == ["r", "r"]


def test_repeated_finished_ids_report_once_even_when_the_id_is_reused(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint, repeat_finished_after=12)  # async scheduling repeats finished ids
    for i in range(3):
        e.add(f"r{i}", prompt(10 + i, 70))
    e.run(lambda: not e.reqs)
    assert sorted(e.sent) == ["r0", "r1", "r2"]  # once each (MiniVllm fails on a report of freed blocks)
    # r0 again at once, another prompt: its store has run when vLLM repeats
    # the old r0's finish. The repeat must neither report the new r0 while
    # it runs nor use up the report of its real finish.
    r = e.add("r0", prompt(20, 70), max_tokens=40)
    e.run_all()
    assert len(r.outputs) == 40 and sorted(e.sent) == ["r0", "r0", "r1", "r2"]
    end = e.steps + 15
    e.run(lambda: e.steps >= end)  # the last repeats come and go
    assert sorted(e.sent) == ["r0", "r0", "r1", "r2"]


def test_abort_in_every_phase_frees_every_block(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    p = prompt(30, 100)
    serve(e, "seed", p)
    srv.stop_process()  # lookups pend: abort one while its lookup runs
    e.add("look", prompt(31, 70))
    e.step()
    e.abort("look")
    srv.cont()
    load = e.add("load", p)  # abort while its retrieve is in flight
    e.run(lambda: load.status == "loading")
    e.abort("load")
    run = e.add("run", prompt(32, 70), max_tokens=50)  # abort while running, its store in flight
    e.run(lambda: run.status == "running" and run.outputs)
    e.abort("run")
    e.run_all()
    assert "run" in e.sent and "load" in e.received
    assert not e.held and not e.loading_aborted
    wait_until(lambda: no_locks_left(srv))


def test_server_sigkill_mid_request_costs_recompute(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    p = prompt(40, 100)
    serve(e, "a", p)
    # The lookup hit; the server dies before the worker starts the retrieve.
    e.before_worker = once(lambda plan: plan.loads, srv.kill)
    b = serve(e, "b", p)
    assert b.loaded_tokens == 0 and e.load_error_blocks == 6 and e.received == ["b"]
    c = serve(e, "c", p)  # no server: a miss, nothing stuck
    assert c.loaded_tokens == 0
    srv.start()  # a new, empty server on the same socket: the worker registers again
    wait_until(lambda: healthy(e) and e.w_adapter.registered)
    serve(e, "d", p)
    d = serve(e, "e", p)
    assert d.loaded_tokens == 96


def test_server_sigstop_costs_recompute_and_recovers(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    p = prompt(50, 100)
    serve(e, "a", p)
    wait_until(lambda: healthy(e))
    t0 = time.monotonic()
    e.before_worker = once(lambda plan: plan.loads, srv.stop_process)
    b = serve(e, "b", p)  # hit, but the server hangs before it answers the retrieve
    assert b.loaded_tokens == 0 and e.load_error_blocks == 6
    for i in range(3):    # while it hangs: misses and skipped stores, none stuck
        serve(e, f"hang{i}", prompt(51 + i, 70))
    assert time.monotonic() - t0 < 6
    srv.cont()
    wait_until(lambda: healthy(e))
    c = serve(e, "c", p)
    assert c.loaded_tokens == 96


def test_warmup_longer_than_the_reap_timeout(server_factory, engines):
    srv = server_factory(SERVER_ARGS + ["--reap-timeout-s", "1"])
    # The gate stays closed until vLLM serves: no pings while "warming up".
    e = engines(srv.endpoint, gate_trigger="explicit_ready")
    assert e.w_adapter.registered
    time.sleep(2.5)  # model loading, graph capture...: silent past the reaper's timeout
    p = prompt(60, 100)
    serve(e, "a", p)
    b = serve(e, "b", p)
    assert b.loaded_tokens == 96


def test_engine_before_server(server_factory, engines):
    srv = server_factory(SERVER_ARGS, start=False)
    e = engines(srv.endpoint)  # registration not acknowledged: kept
    a = serve(e, "a", prompt(70, 100))
    assert a.loaded_tokens == 0
    srv.start()
    wait_until(lambda: healthy(e) and e.w_adapter.registered)
    serve(e, "b", prompt(70, 100))
    c = serve(e, "c", prompt(70, 100))
    assert c.loaded_tokens == 96


def test_shutdown_is_bounded_even_with_a_hung_server(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    e.add("a", prompt(80, 100), max_tokens=50)
    e.run(lambda: e.reqs["a"].outputs)  # its store started
    srv.stop_process()
    t0 = time.monotonic()
    e.shutdown()
    assert time.monotonic() - t0 < e.settings.call_timeout_s + 1.5
    srv.cont()


def test_shutdown_unregisters_and_a_new_engine_hits(server_factory, engines):
    srv = server_factory(SERVER_ARGS)
    e = engines(srv.endpoint)
    serve(e, "a", prompt(90, 100))
    assert server_stats(srv)["registrations"] == 1
    e.shutdown()
    st = server_stats(srv)
    assert st["registrations"] == 0 and st["op_unregister_kv_cache_requests"] == 1
    f = engines(srv.endpoint)  # vLLM restarted: the chunks are still there
    assert f.w_adapter.registered
    wait_until(lambda: f.s_adapter.chunk_size == CHUNK)  # its scheduler said HELLO: lookups go out
    b = serve(f, "b", prompt(90, 100))
    assert b.loaded_tokens == 96
