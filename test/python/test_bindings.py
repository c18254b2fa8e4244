"""The kvlink package against the real kvlink-server: the three call forms,
errors, the GIL, where Python runs, events, the CPU KV cache views."""
import asyncio
import os
import threading
import time

import pytest
import torch

import kvlink

FAST = dict(interval=0.05, ping_timeout=0.2, reconnect_initial=0.01, reconnect_max=0.05, connect_timeout=0.2)
# 16 tokens x 4 heads x 32 x 2 bytes = 4 KiB per block and plane: the
# server's smallest chunk.
LAYOUT = dict(num_layers=2, num_blocks=32, block_size=16, num_kv_heads=4, head_size=32, dtype_size=2)


def worker_config(server, **kw):
    return kvlink.WorkerConfig(endpoint=server.endpoint, model="m", health=kvlink.HealthConfig(**FAST), **kw)


def scheduler_config(server, **kw):
    return kvlink.SchedulerConfig(endpoint=server.endpoint, model="m", health=kvlink.HealthConfig(**FAST), **kw)


def connected_scheduler(rt, server, **kw):
    """A scheduler adapter whose link said HELLO (a call made before that
    fails with not_connected, as it does while the server is down)."""
    sched = kvlink.SchedulerAdapter(rt, scheduler_config(server, **kw))
    assert wait_until(lambda: sched.chunk_size > 0)
    return sched


def wait_until(pred, timeout=5.0, rt=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rt is not None:
            rt.poll()
        if pred():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def rt():
    r = kvlink.Runtime()
    yield r
    r.stop()


@pytest.fixture
def registered(rt, server):
    """A worker with a registered CPU KV cache (torch float16 views)."""
    worker = kvlink.WorkerAdapter(rt, worker_config(server))
    cache = kvlink.CpuKvCache(kvlink.paged_layout(**LAYOUT))
    worker.register_kv_caches(cache.layout, cache.fd)
    return worker, cache, cache.torch_layers(torch.float16)


def test_configs_take_keywords_with_the_cpp_defaults():
    c = kvlink.WorkerConfig(endpoint="unix:/x", transfer_timeout=2.5)
    assert (c.endpoint, c.transfer_timeout, c.blocking_deadline, c.call_timeout) == ("unix:/x", 2.5, 10.0, 5.0)
    assert c.gate_trigger == kvlink.GateTrigger.register_ack and c.chunk_size == 0
    c.health.interval = 0.25  # nested configs are edited in place
    assert c.health.interval == 0.25 and kvlink.HealthConfig().interval == 1.0
    assert kvlink.SchedulerConfig().lookup_mode == kvlink.LookupMode.two_phase
    with pytest.raises(TypeError, match="unknown field 'transfer_timeut'.*transfer_timeout"):
        kvlink.WorkerConfig(transfer_timeut=1)
    with pytest.raises(ValueError, match="call_timeout must be a number of seconds"):
        kvlink.WorkerConfig(call_timeout=-1)
    with pytest.raises(TypeError):
        kvlink.WorkerConfig(world_size=-1)


def test_bad_endpoint_is_a_clear_error(rt):
    with pytest.raises(ValueError, match="endpoint"):
        kvlink.SchedulerAdapter(rt, kvlink.SchedulerConfig(endpoint="http://nope", model="m"))


def test_store_then_retrieve_every_byte_blocking(rt, server, registered):
    worker, cache, layers = registered
    for layer in layers:
        layer[:, 0:4].normal_()
    tokens = list(range(100, 164))
    stored = worker.submit_store(kvlink.TransferSpec(request_id="a", tokens=tokens, block_ids=[0, 1, 2, 3]))
    assert (stored.stored_chunks, stored.skipped_chunks) == (4, 0)
    sched = connected_scheduler(rt, server)
    sched.submit_lookup("b", tokens)
    assert sched.check_lookup("b") == kvlink.LookupStatus(ready=True, matched_tokens=64)
    got = worker.submit_retrieve(kvlink.TransferSpec(request_id="b", tokens=tokens, block_ids=[9, 8, 20, 21]))
    assert got.retrieved_chunks == 4
    for layer in layers:
        assert torch.equal(layer[:, [9, 8, 20, 21]], layer[:, 0:4])
    assert not torch.equal(layers[0][:, 9], layers[0][:, 10])  # block 10 was not written
    finished = worker.get_finished(["a", "b"])
    assert (finished.stores, finished.retrieves) == (["a"], ["b"])
    m = worker.metrics()
    assert m["stored_chunks"] == 4 and m["retrieved_bytes"] == 4 * 2 * 2 * LAYOUT["block_size"] * 4 * 32 * 2
    assert "kvlink_engine_" in worker.metrics_text()
    health = m["health"]
    assert health["connects_ok"] >= 1 and health["pings_ok"] >= 1 and health["pings_failed"] == 0
    assert health["seconds_in_state"]["healthy"] > 0 and m["state"] == kvlink.State.healthy


def test_a_call_completes_only_in_poll_on_the_polling_thread(rt, server):
    sched = connected_scheduler(rt, server)
    sched.submit_lookup("r", list(range(32)))
    call = sched.async_check_lookup("r")
    threads = []
    call.add_done_callback(lambda c: threads.append(threading.get_ident()))
    time.sleep(0.2)  # the answer is back long since, but nobody polled
    assert not call.done() and threads == []
    with pytest.raises(RuntimeError, match="poll"):
        call.result()
    assert wait_until(call.done, rt=rt)
    assert threads == [threading.get_ident()]
    assert call.result() == kvlink.LookupStatus(ready=True, matched_tokens=0)
    assert call.exception() is None
    late = []
    call.add_done_callback(late.append)  # already done: runs at once
    assert late == [call]


def test_asyncio_await_many_calls_and_errors(rt, server):
    sched = connected_scheduler(rt, server)

    async def main():
        await asyncio.gather(*(sched.async_submit_lookup(f"r{i}", list(range(48))) for i in range(20)))
        answers = await asyncio.gather(*(sched.async_check_lookup(f"r{i}") for i in range(20)))
        assert all(a.ready and a.matched_tokens == 0 for a in answers)
        with pytest.raises(kvlink.Error) as e:
            await sched.async_check_lookup("never-submitted")
        assert e.value.code == "not_found"
        # A cancelled await leaves the loop and the runtime working.
        task = asyncio.ensure_future(sched.async_check_lookup("r0"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await sched.async_check_lookup("r1")

    assert asyncio.run(main()).ready
    # A second loop on the same runtime works too.
    assert asyncio.run(_await(sched.async_check_lookup("r2"))).ready


async def _await(call):
    return await call


def test_blocking_call_releases_the_gil_and_meets_its_deadline(rt, server):
    sched = connected_scheduler(rt, server, lookup_mode=kvlink.LookupMode.sync)
    sched.submit_lookup("warm", list(range(16)))
    server.stop_process()  # hung: nothing answers
    ticks = 0
    outcome = {}

    def blocked():
        start = time.monotonic()
        try:
            sched.submit_lookup("hung", list(range(16)), timeout=0.5)
        except kvlink.Error as e:
            outcome["code"] = e.code
        outcome["took"] = time.monotonic() - start

    t = threading.Thread(target=blocked)
    t.start()
    while t.is_alive():
        ticks += 1  # Python keeps running while the call waits
        time.sleep(0.001)
    server.cont()
    assert outcome["code"] == "timed_out"
    assert 0.45 <= outcome["took"] < 1.5
    assert ticks > 50


def test_events_arrive_in_poll_and_degraded_calls_fail_fast(rt, server, registered):
    worker, cache, layers = registered
    events = []
    worker.on_event(lambda e: events.append((e, threading.get_ident())))
    assert wait_until(lambda: worker.state == kvlink.State.healthy)
    server.kill()
    assert wait_until(lambda: worker.state == kvlink.State.degraded)
    assert wait_until(lambda: any(e.to_state == kvlink.State.degraded for e, _ in events), rt=rt)
    assert {tid for _, tid in events} == {threading.get_ident()}
    start = time.monotonic()
    with pytest.raises(kvlink.Error) as e:
        worker.submit_store(kvlink.TransferSpec(request_id="s", tokens=list(range(32)), block_ids=[0, 1]))
    assert e.value.code == "unhealthy" and time.monotonic() - start < 0.2
    with pytest.raises(kvlink.Error):
        worker.submit_retrieve(kvlink.TransferSpec(request_id="r", tokens=list(range(32)), block_ids=[5, 6]))
    assert worker.take_load_errors() == [5, 6]
    server.start()  # a restarted server: the registration is sent again by itself
    assert wait_until(lambda: worker.state == kvlink.State.healthy and worker.registered)
    assert worker.reregistrations >= 1


def test_a_refused_registration_says_why(rt, server):
    worker = kvlink.WorkerAdapter(rt, worker_config(server))
    tiny = kvlink.paged_layout(num_layers=1, num_blocks=8, block_size=16, num_kv_heads=1, head_size=1, dtype_size=2)
    cache = kvlink.CpuKvCache(tiny)
    with pytest.raises(kvlink.Error) as e:
        worker.register_kv_caches(cache.layout, cache.fd)
    assert e.value.code == "bad_request" and "minimum" in e.value.message


def test_engine_starts_before_the_server(rt, server_factory):
    server = server_factory(["--chunk-size", "16"], start=False)
    worker = kvlink.WorkerAdapter(rt, worker_config(server, call_timeout=5.0))
    cache = kvlink.CpuKvCache(kvlink.paged_layout(**LAYOUT))
    call = worker.async_register_kv_caches(cache.layout, cache.fd)
    time.sleep(0.2)
    server.start()
    assert wait_until(call.done, rt=rt)
    assert call.result() is None and worker.registered
    assert wait_until(lambda: worker.state == kvlink.State.healthy)


def test_ping_and_timeouts(rt, server):
    sched = connected_scheduler(rt, server)
    assert sched.ping() > 0
    with pytest.raises(ValueError, match="timeout"):
        sched.check_lookup("x", timeout=-1)
    server.kill()
    assert wait_until(lambda: sched.state == kvlink.State.degraded or _ping_fails(sched))


def _ping_fails(adapter):
    try:
        adapter.ping(timeout=0.2)
        return False
    except kvlink.Error as e:
        return e.code in ("not_connected", "connection_lost", "timed_out")


def test_a_forked_child_makes_its_own_runtime(rt, server):
    sched = connected_scheduler(rt, server)
    parent_instance = sched.instance_id
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 10
        try:
            try:
                sched.check_lookup("x", timeout=0.2)
                code = 11
            except kvlink.Error as e:
                code = 12 if e.code != "shutting_down" or "fork" not in e.message else 13
            if code == 13:
                own = kvlink.Runtime()
                child = connected_scheduler(own, server)
                child.submit_lookup("c", list(range(32)))
                ok = child.check_lookup("c").ready and child.instance_id != parent_instance
                own.stop()
                code = 0 if ok else 14
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sched.submit_lookup("p", list(range(32)))  # the parent's runtime is untouched
    assert sched.check_lookup("p").ready


def test_stopped_runtime_refuses_new_adapters():
    r = kvlink.Runtime()
    r.stop()
    r.stop()  # idempotent
    with pytest.raises(kvlink.Error) as e:
        kvlink.SchedulerAdapter(r, kvlink.SchedulerConfig(endpoint="unix:/nowhere", model="m"))
    assert e.value.code == "shutting_down"


def test_cpu_cache_views_and_bad_layouts():
    cache = kvlink.CpuKvCache(kvlink.paged_layout(**LAYOUT))
    layers = cache.torch_layers(torch.float16)
    assert [tuple(t.shape) for t in layers] == [(2, 32, 16, 4, 32)] * 2
    layers[1][1, 3].fill_(1.0009765625)  # layer 1, V plane, block 3; fp16 0x3c01: no zero byte
    raw = cache.numpy()
    offset = cache.layout.layers[1].offset + cache.layout.plane_stride + 3 * cache.layout.block_stride
    written = raw.nonzero()[0]
    assert (written.min(), written.max(), len(written)) == (offset, offset + cache.layout.block_bytes - 1,
                                                            cache.layout.block_bytes)
    with pytest.raises(kvlink.Error, match="dtype_size"):
        cache.torch_layers(torch.float32)
    bad = kvlink.paged_layout(**LAYOUT)
    bad.num_layers = 0
    with pytest.raises(kvlink.Error) as e:
        bad.check()
    assert e.value.code == "bad_request"
    with pytest.raises(kvlink.Error):
        kvlink.CpuKvCache(bad)


def test_export_kv_cache_names_what_is_wrong():
    with pytest.raises(kvlink.Error) as e:
        kvlink.export_kv_cache([torch.zeros(2, 4, 16, 2, 8, dtype=torch.float16)])
    assert e.value.code == "bad_request"
    assert "CUDA" in e.value.message
    with pytest.raises(kvlink.Error, match="none"):
        kvlink.export_kv_cache([])
