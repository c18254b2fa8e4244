"""The vLLM shell, kvlink.vllm.KvlinkConnector, with vLLM itself.

Runs only where `import vllm` works; elsewhere every test reports itself
skipped with the reason. The decisions behind the shell are tested
without vLLM in test_connector_core.py and test_connector_e2e.py.
"""
import importlib
import time
from types import SimpleNamespace

import pytest

try:
    import vllm  # noqa: F401
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole)
    VLLM_MISSING = None
except Exception as e:  # not installed, or an install that cannot import
    VLLM_MISSING = (f"vllm is not importable here ({type(e).__name__}: {e}); the connector's core is tested without "
                    "it by test_connector_core.py and test_connector_e2e.py")

# Every test reports itself skipped, with the reason, where vllm is missing.
pytestmark = pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")

torch = pytest.importorskip("torch")

BS, CHUNK = 16, 32
FAST = dict(health_interval_s=0.05, ping_timeout_s=0.1, connect_timeout_s=0.2, reconnect_max_s=0.05,
            call_timeout_s=0.5, transfer_timeout_s=0.5)


def vllm_config(endpoint, **extra):
    """What the connector reads of vLLM's config; the transfer config is vLLM's own class."""
    transfer = KVTransferConfig(kv_connector="KvlinkConnector", kv_connector_module_path="kvlink.vllm",
                                kv_role="kv_both",
                                kv_connector_extra_config={"endpoint": endpoint, "chunk_size": CHUNK, **FAST, **extra})
    return SimpleNamespace(kv_transfer_config=transfer,
                           model_config=SimpleNamespace(served_model_name="shell-model", model="shell-model",
                                                        use_mla=False),
                           cache_config=SimpleNamespace(block_size=BS),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))


def make(role, endpoint, monkeypatch=None, **extra):
    from kvlink.vllm import KvlinkConnector
    if role == KVConnectorRole.WORKER:
        import vllm.distributed.parallel_state as ps  # a single worker, no process group
        monkeypatch.setattr(ps, "get_pp_group", lambda: SimpleNamespace(rank_in_group=0))
        monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 0)
    return KvlinkConnector(vllm_config(endpoint, **extra), role, None)


def request(rid, tokens, **kw):
    """Shaped like vllm.v1.request.Request, as far as the connector reads it."""
    return SimpleNamespace(request_id=rid, all_token_ids=list(tokens), prompt_token_ids=list(tokens),
                           mm_features=[], lora_request=None, cache_salt=None, **kw)


def blocks(ids):
    """Shaped like KVCacheBlocks: block ids per KV-cache group."""
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def scheduler_output(new=(), finished=(), preempted=()):
    """Shaped like vllm.v1.core.sched.output.SchedulerOutput."""
    new = list(new)
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=rid, prompt_token_ids=list(toks), block_ids=(list(ids),),
                                            num_computed_tokens=computed, mm_features=[], lora_request=None,
                                            cache_salt=None)
                            for rid, toks, ids, computed, _ in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                              num_computed_tokens=[]),
        num_scheduled_tokens={rid: n for rid, _, _, _, n in new},
        finished_req_ids=set(finished), preempted_req_ids=set(preempted))


def test_loadable_the_way_vllm_loads_it():
    module = importlib.import_module("kvlink.vllm")  # kv_connector_module_path
    cls = getattr(module, "KvlinkConnector")         # kv_connector
    assert issubclass(cls, KVConnectorBase_V1)
    assert not getattr(cls, "__abstractmethods__", frozenset())  # every hook vLLM requires is there
    assert issubclass(module.KvlinkConnectorMetadata, KVConnectorMetadata)


def test_chunk_size_not_a_multiple_of_the_block_size_stops_vllm_with_the_reason():
    with pytest.raises(ValueError, match="chunk_size"):
        make(KVConnectorRole.SCHEDULER, "unix:/nonexistent.sock", chunk_size=24)


def test_scheduler_role_plans_stores_and_loads(server_factory):
    srv = server_factory(["--chunk-size", str(CHUNK)])
    c = make(KVConnectorRole.SCHEDULER, srv.endpoint)
    try:
        tokens = list(range(1, 101))
        deadline = time.monotonic() + 5
        while (got := c.get_num_new_matched_tokens(request("r1", tokens), 0))[0] is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert got == (0, False)  # an empty server
        c.update_state_after_alloc(request("r1", tokens), blocks([]), 0)
        meta = c.build_connector_meta(scheduler_output(new=[("r1", tokens, range(7), 0, 100)]))
        assert [(t.request_id, t.block_ids) for t in meta.plan.stores] == [("r1", list(range(6)))]
        assert c.request_finished(request("r1", tokens), list(range(7))) == (True, None)
        assert c.build_connector_meta(scheduler_output(finished={"r1"})).plan.held_ids == {"r1"}
        # Multimodal requests are not shared by their tokens.
        assert c.get_num_new_matched_tokens(request("mm", tokens, mm_hashes=["h"]), 0) == (0, False)
    finally:
        c.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the worker side moves CUDA KV caches: needs a GPU")
def test_store_and_load_through_both_roles_on_the_gpu(server_factory, monkeypatch):
    import kvlink
    if not kvlink.have_cuda:
        pytest.skip("this kvlink was built without CUDA")
    srv = server_factory(["--chunk-size", str(CHUNK)])
    sched = make(KVConnectorRole.SCHEDULER, srv.endpoint)
    worker = make(KVConnectorRole.WORKER, srv.endpoint, monkeypatch)
    layers = {f"layer.{i}": torch.zeros(2, 64, BS, 2, 8, dtype=torch.float16, device="cuda") for i in range(2)}
    try:
        worker.register_kv_caches(layers)
        tokens = list(range(1, 101))

        def step(output, finished=()):
            meta = sched.build_connector_meta(output)
            worker.bind_connector_metadata(meta)
            worker.handle_preemptions(meta)
            worker.start_load_kv(None)
            worker.wait_for_save()
            fin = worker.get_finished(set(finished))
            errors = worker.get_block_ids_with_load_errors()
            worker.clear_connector_metadata()
            return fin, errors

        def ask(rid):
            deadline = time.monotonic() + 5
            while (got := sched.get_num_new_matched_tokens(request(rid, tokens), 0))[0] is None:
                assert time.monotonic() < deadline
                step(scheduler_output())
            return got

        ask("a")
        for t in layers.values():  # the forward pass of a: a pattern per layer, plane and block
            t.copy_(torch.arange(t.numel(), device="cuda").view(t.shape).to(torch.float16))
        step(scheduler_output(new=[("a", tokens, range(7), 0, 100)]))
        assert sched.request_finished(request("a", tokens), list(range(7)))[0]
        deadline = time.monotonic() + 5
        while step(scheduler_output(finished={"a"}), {"a"})[0][0] != {"a"}:  # a's stores reported
            assert time.monotonic() < deadline
        expected = {n: t[:, :6].clone() for n, t in layers.items()}
        assert ask("b") == (96, True)
        sched.update_state_after_alloc(request("b", tokens), blocks(range(20, 27)), 96)
        for t in layers.values():
            t[:, 20:26] = -1
        deadline = time.monotonic() + 5
        while True:
            (_, recving), errors = step(scheduler_output())
            if recving:
                break
            assert time.monotonic() < deadline
        assert recving == {"b"} and not errors
        for n, t in layers.items():
            assert torch.equal(t[:, 20:26], expected[n])
    finally:
        worker.shutdown()
        sched.shutdown()
