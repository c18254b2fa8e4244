"""Unit tests of the connector core's decisions (kvlink.connector), with
fake adapters and runtime: no server, no vLLM, no torch."""
import logging
import os
from types import SimpleNamespace

import pytest

from kvlink import Error
from kvlink.connector import (CachedRequest, ConnectorSettings, NewRequest, SchedulerCore, SchedulerStep,
                              StepPlan, Transfer, WorkerCore)

BS = 16     # vLLM block size
CHUNK = 32  # two blocks per chunk


class FakeCall:
    def __init__(self, value=None, error=None, polls=1):
        self._done = False
        self.value, self.error = value, error
        self.polls = polls  # completes at the polls-th poll() after it started

    def done(self):
        return self._done

    def result(self):
        assert self._done, "result() before done()"
        if self.error:
            raise self.error
        return self.value


class FakeRuntime:
    """Completes the calls handed to it at the next poll(), like kvlink's
    host queue; `hold` keeps calls from completing (a hung server)."""

    def __init__(self):
        self.queue = []
        self.hold = False
        self.polls = 0
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # always readable: waits never sleep

    def add(self, call):
        self.queue.append(call)
        return call

    def poll(self):
        self.polls += 1
        if self.hold:
            return 0
        for c in self.queue:
            c.polls -= 1
            c._done = c.polls <= 0
        n = len(self.queue)
        self.queue = [c for c in self.queue if not c._done]
        return n - len(self.queue)

    def host_fd(self):
        return self._r


class FakeScheduler:
    def __init__(self, rt, matched=None, chunk_size=CHUNK):
        self.rt = rt
        self.matched = dict(matched or {})  # request id -> matched tokens
        self.chunk_size = chunk_size
        self.submits, self.checks, self.freed, self.ended = [], [], [], []
        self.stopped = False

    def async_submit_lookup(self, rid, tokens):
        self.submits.append((rid, list(tokens)))
        return self.rt.add(FakeCall())

    def async_check_lookup(self, rid):
        self.checks.append(rid)
        return self.rt.add(FakeCall(SimpleNamespace(ready=True, matched_tokens=self.matched.get(rid, 0))))

    def free_lookup_locks(self, rid, start, end):
        self.freed.append((rid, start, end))

    def end_session(self, rid):
        self.ended.append(rid)

    def stop(self):
        self.stopped = True


def settings(**kw):
    return ConnectorSettings.from_extra_config({"chunk_size": CHUNK, **kw}, block_size=BS, model="m")


def scheduler(matched=None, **kw):
    rt = FakeRuntime()
    adapter = FakeScheduler(rt, matched, **{k: v for k, v in kw.items() if k == "chunk_size"})
    core = SchedulerCore(adapter, rt, settings(**{k: v for k, v in kw.items() if k != "chunk_size"}), BS)
    return core, adapter, rt


def ask(core, rid, tokens, local=0, steps=5):
    """get_num_new_matched_tokens until it answers, like vLLM's steps."""
    for _ in range(steps):
        n, is_async = core.get_num_new_matched_tokens(rid, tokens, local)
        if n is not None:
            return n, is_async
    raise AssertionError(f"no lookup answer for {rid} after {steps} steps")


TOKENS = list(range(100, 200))  # 100 tokens: 3 full chunks of 32 and 4 tokens


# ---- settings ------------------------------------------------------------------------


def test_settings_defaults_and_model_from_vllm():
    s = ConnectorSettings.from_extra_config(None, block_size=16, model="llama")
    assert s.endpoint == "unix:/tmp/kvlink-0.sock" and s.chunk_size == 256 and s.model == "llama"
    assert ConnectorSettings.from_extra_config({"model": "mine"}, block_size=16, model="llama").model == "mine"


def test_settings_chunk_size_not_a_multiple_of_block_size_names_key_and_fix():
    with pytest.raises(ValueError) as e:
        ConnectorSettings.from_extra_config({"chunk_size": 24}, block_size=16, model="m")
    assert "chunk_size" in str(e.value) and "multiple of 16" in str(e.value) and "--chunk-size" in str(e.value)


@pytest.mark.parametrize("extra, words", [
    ({"chunk_sise": 256}, ["chunk_sise", "chunk_size"]),             # typo: unknown key, known ones listed
    ({"chunk_size": True}, ["chunk_size", "number"]),
    ({"chunk_size": 25.5}, ["chunk_size", "whole number"]),
    ({"call_timeout_s": "5"}, ["call_timeout_s", "number"]),
    ({"call_timeout_s": 0}, ["call_timeout_s", "above 0"]),
    ({"failure_threshold": 0}, ["failure_threshold", "at least 1"]),
    ({"lookup_mode": "async"}, ["lookup_mode", "two_phase"]),
    ({"gate_trigger": "now"}, ["gate_trigger", "explicit_ready"]),
    ({"endpoint": "/tmp/x.sock"}, ["endpoint", "unix:"]),
    ({"endpoint": 5}, ["endpoint", "string"]),
])
def test_settings_bad_input_is_a_clear_value_error(extra, words):
    with pytest.raises(ValueError) as e:
        ConnectorSettings.from_extra_config(extra, block_size=16, model="m")
    for w in words:
        assert w in str(e.value)


def test_settings_without_a_model_name():
    with pytest.raises(ValueError, match="model"):
        ConnectorSettings.from_extra_config({}, block_size=16, model="")


# ---- scheduler: lookups ---------------------------------------------------------------


def test_lookup_is_asynchronous_then_answered_and_stable():
    core, a, rt = scheduler({"r1": 64})
    assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (None, False)  # submitted
    assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (None, False)  # checking
    assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (64, True)
    # vLLM may ask again (allocation failed): same answer, nothing sent.
    assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (64, True)
    assert len(a.submits) == 1 and len(a.checks) == 1
    assert a.submits[0] == ("r1", TOKENS)


def test_lookup_answer_beyond_vllms_own_prefix_hit():
    core, a, _ = scheduler({"r1": 64})
    assert ask(core, "r1", TOKENS, local=16) == (48, True)
    assert core.get_num_new_matched_tokens("r1", TOKENS, 64) == (0, False)
    assert core.get_num_new_matched_tokens("r1", TOKENS, 80) == (0, False)


def test_miss_loads_nothing_and_frees_nothing():
    core, a, _ = scheduler({})
    assert ask(core, "r1", TOKENS) == (0, False)
    core.update_state_after_alloc("r1", list(range(7)), 0)
    assert a.freed == []
    assert core.build_connector_meta(SchedulerStep()).loads == []


def test_matched_tokens_are_clamped_to_full_chunks_of_the_prompt():
    core, _, _ = scheduler({"r1": 1000})
    assert ask(core, "r1", TOKENS) == (96, True)


def test_hung_lookup_ends_as_a_miss(caplog):
    core, a, rt = scheduler({"r1": 64}, call_timeout_s=0.01)  # the lookup's bound is 2 x 0.01 + 1 s
    rt.hold = True
    assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (None, False)
    import time
    time.sleep(1.1)
    with caplog.at_level(logging.WARNING, logger="kvlink.connector"):
        assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (0, False)
    assert "no answer" in caplog.text


def test_failed_check_counts_as_miss():
    core, a, rt = scheduler({"r1": 64})
    a.async_check_lookup = lambda rid: rt.add(FakeCall(error=Error("connection_lost")))
    assert ask(core, "r1", TOKENS) == (0, False)


def test_non_kvlink_exceptions_are_not_swallowed():
    core, a, rt = scheduler({"r1": 64})
    a.async_check_lookup = lambda rid: rt.add(FakeCall(error=KeyError("bug")))
    with pytest.raises(KeyError):
        ask(core, "r1", TOKENS)


def test_chunk_size_disagreeing_with_the_server_disables_kvlink(caplog):
    core, a, _ = scheduler({"r1": 64}, chunk_size=64)  # server: 64, ours: 32
    with caplog.at_level(logging.ERROR, logger="kvlink.connector"):
        assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (0, False)
        assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (0, False)
        plan = core.build_connector_meta(SchedulerStep(new_requests=[NewRequest("r1", TOKENS, list(range(7)), 0,
                                                                                100)]))
    assert a.submits == [] and plan.stores == []
    assert len(caplog.records) == 1 and "64-token chunks" in caplog.text  # said once


# ---- scheduler: loads -------------------------------------------------------------------


def test_load_plan_names_blocks_from_chunk_zero_and_skips_local_tokens():
    core, a, _ = scheduler({"r1": 96})
    assert ask(core, "r1", TOKENS, local=16) == (80, True)
    blocks = [10, 11, 12, 13, 14, 15, 16]
    core.update_state_after_alloc("r1", blocks, 80)
    plan = core.build_connector_meta(SchedulerStep())
    assert plan.loads == [Transfer("r1", TOKENS[:96], blocks[:6], skip_tokens=16)]
    assert a.freed == []  # the retrieve releases the locks of the chunks it names
    # vLLM's second update_state_after_alloc (after the load): nothing new.
    core.update_state_after_alloc("r1", blocks, 0)
    assert core.build_connector_meta(SchedulerStep()).loads == [] and a.freed == []


def test_locks_freed_when_vllm_loads_nothing():
    core, a, _ = scheduler({"r1": 64})
    assert ask(core, "r1", TOKENS, local=64) == (0, False)
    core.update_state_after_alloc("r1", list(range(7)), 0)
    assert a.freed == [("r1", 0, 2)]
    assert core.build_connector_meta(SchedulerStep()).loads == []


def test_vllm_accepting_more_than_matched_is_refused():
    core, _, _ = scheduler({"r1": 64})
    ask(core, "r1", TOKENS)
    with pytest.raises(ValueError, match="r1"):
        core.update_state_after_alloc("r1", list(range(7)), 96)


def test_failed_load_asked_again_is_computed_not_reloaded():
    core, a, _ = scheduler({"r1": 64})
    ask(core, "r1", TOKENS)
    core.update_state_after_alloc("r1", list(range(7)), 64)
    core.build_connector_meta(SchedulerStep())
    # Every block failed: vLLM freed them and asks again before running it.
    assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (0, False)
    assert len(a.submits) == 1


# ---- scheduler: stores ------------------------------------------------------------------


def new(rid, blocks, computed, scheduled, prompt=TOKENS):
    return NewRequest(rid, prompt, blocks, computed, scheduled)


def cached(rid, new_blocks, computed, scheduled, resumed=False):
    return CachedRequest(rid, new_blocks, computed, scheduled, resumed)


def test_only_full_prompt_chunks_are_stored_as_prefill_proceeds():
    core, a, _ = scheduler({})
    ask(core, "r1", TOKENS)
    core.update_state_after_alloc("r1", [0, 1], 0)
    # Chunked prefill: 40 tokens, then 40, then 20 (prompt done), then decode.
    plan = core.build_connector_meta(SchedulerStep(new_requests=[new("r1", [0, 1, 2], 0, 40)]))
    assert plan.stores == [Transfer("r1", TOKENS[:32], [0, 1])]
    plan = core.build_connector_meta(SchedulerStep(cached_requests=[cached("r1", [3, 4], 40, 40)]))
    assert plan.stores == [Transfer("r1", TOKENS[:64], [0, 1, 2, 3])]
    plan = core.build_connector_meta(SchedulerStep(cached_requests=[cached("r1", [5, 6], 80, 20)]))
    assert plan.stores == [Transfer("r1", TOKENS[:96], [0, 1, 2, 3, 4, 5])]  # not the 4-token tail
    for step in range(30):  # decode tokens are never stored
        plan = core.build_connector_meta(SchedulerStep(cached_requests=[cached("r1", [7 + step], 100 + step, 1)]))
        assert plan.stores == []
    assert core.request_finished("r1") is True
    assert a.ended == ["r1"]
    plan = core.build_connector_meta(SchedulerStep())  # the workers learn it once
    assert plan.finished_ids == {"r1"} and plan.held_ids == {"r1"}
    plan = core.build_connector_meta(SchedulerStep())
    assert plan.finished_ids == set() and plan.held_ids == set()


def test_short_prompt_has_nothing_to_store_and_frees_blocks_at_once():
    core, a, _ = scheduler({})
    ask(core, "r1", TOKENS[:20])
    plan = core.build_connector_meta(SchedulerStep(new_requests=[new("r1", [0, 1], 0, 20, TOKENS[:20])]))
    assert plan.stores == []
    assert core.request_finished("r1") is False
    plan = core.build_connector_meta(SchedulerStep())
    assert plan.finished_ids == {"r1"} and plan.held_ids == set()


def test_chunks_matched_and_loaded_are_not_stored_again():
    core, _, _ = scheduler({"r1": 64})
    ask(core, "r1", TOKENS)
    core.update_state_after_alloc("r1", list(range(7)), 64)
    core.build_connector_meta(SchedulerStep())
    plan = core.build_connector_meta(SchedulerStep(new_requests=[new("r1", list(range(7)), 64, 36)]))
    assert plan.stores == [Transfer("r1", TOKENS[:96], list(range(6)))]


def test_chunks_that_failed_to_load_are_stored_after_recompute():
    core, _, _ = scheduler({"r1": 64})
    ask(core, "r1", TOKENS)
    core.update_state_after_alloc("r1", list(range(7)), 64)
    core.build_connector_meta(SchedulerStep())
    # Block 2 failed: vLLM recomputes from token 32; only chunk 0 counts as held.
    plan = core.build_connector_meta(SchedulerStep(new_requests=[new("r1", list(range(7)), 32, 68)]))
    assert plan.stores == [Transfer("r1", TOKENS[:96], list(range(6)))]
    assert core.request_finished("r1") is True


def test_request_unknown_to_the_core_is_ignored():
    core, _, _ = scheduler({})
    plan = core.build_connector_meta(SchedulerStep(cached_requests=[cached("ghost", [1], 0, 40)]))
    assert plan.stores == [] and core.request_finished("ghost") is False


# ---- scheduler: preemption, abort -----------------------------------------------------


def test_preempted_request_is_looked_up_again_and_its_new_blocks_replace_the_old():
    core, a, _ = scheduler({"r1": 0})
    ask(core, "r1", TOKENS)
    core.update_state_after_alloc("r1", [0, 1, 2, 3, 4, 5, 6], 0)
    plan = core.build_connector_meta(SchedulerStep(new_requests=[new("r1", [0, 1, 2, 3, 4, 5, 6], 0, 100)]))
    assert plan.stores == [Transfer("r1", TOKENS[:96], [0, 1, 2, 3, 4, 5])]
    # Preempted in the next step (vLLM says so), then back in the waiting queue.
    plan = core.build_connector_meta(SchedulerStep(preempted_ids={"r1"}))
    assert plan.preempted_ids == {"r1"}
    a.matched["r1"] = 96  # its own chunks are on the server now
    assert ask(core, "r1", TOKENS + [7, 8]) == (96, True)
    assert a.ended == ["r1"] and len(a.submits) == 2  # fresh session and locks
    blocks = [20, 21, 22, 23, 24, 25, 26]
    core.update_state_after_alloc("r1", blocks, 96)
    assert core.build_connector_meta(SchedulerStep()).loads == [Transfer("r1", TOKENS[:96], blocks[:6])]
    plan = core.build_connector_meta(SchedulerStep(cached_requests=[cached("r1", blocks, 96, 6, resumed=True)]))
    assert plan.stores == []  # everything was stored before
    # Its stores read the blocks it had before preemption, which the worker
    # waited for: its new blocks need not wait.
    assert core.request_finished("r1") is False


def test_preempted_request_stores_again_from_its_new_blocks():
    core, a, _ = scheduler({"r1": 0})
    ask(core, "r1", TOKENS)
    core.update_state_after_alloc("r1", [0, 1, 2], 0)
    plan = core.build_connector_meta(SchedulerStep(new_requests=[new("r1", [0, 1, 2], 0, 40)]))
    assert plan.stores == [Transfer("r1", TOKENS[:32], [0, 1])]
    core.build_connector_meta(SchedulerStep(preempted_ids={"r1"}))
    a.matched["r1"] = 32
    assert ask(core, "r1", TOKENS) == (32, True)
    core.update_state_after_alloc("r1", [9, 8], 32)
    core.build_connector_meta(SchedulerStep())
    core.update_state_after_alloc("r1", [9, 8], 0)  # vLLM's second call, after the load
    plan = core.build_connector_meta(SchedulerStep(
        cached_requests=[cached("r1", [9, 8, 7, 6, 5, 4, 3], 32, 68, resumed=True)]))
    assert plan.stores == [Transfer("r1", TOKENS[:96], [9, 8, 7, 6, 5, 4])]
    assert core.request_finished("r1") is True


def test_preempted_request_aborted_while_waiting_does_not_hold_blocks():
    core, a, _ = scheduler({"r1": 0})
    ask(core, "r1", TOKENS)
    core.update_state_after_alloc("r1", list(range(7)), 0)
    core.build_connector_meta(SchedulerStep(new_requests=[new("r1", list(range(7)), 0, 100)]))
    core.build_connector_meta(SchedulerStep(preempted_ids={"r1"}))
    assert core.request_finished("r1") is False


def test_abort_while_lookup_runs_ends_the_session():
    core, a, rt = scheduler({"r1": 64})
    rt.hold = True
    assert core.get_num_new_matched_tokens("r1", TOKENS, 0) == (None, False)
    assert core.request_finished("r1") is False
    assert a.ended == ["r1"]
    rt.hold = False
    rt.poll()  # the late answer lands nowhere
    assert core.request_finished("r1") is False


def test_shutdown_stops_the_adapter_once():
    core, a, _ = scheduler({})
    a.stop = lambda: setattr(a, "stopped", a.stopped + 1)
    a.stopped = 0
    core.shutdown()
    core.shutdown()
    assert a.stopped == 1


# ---- worker ---------------------------------------------------------------------------


class FakeWorker:
    def __init__(self, rt):
        self.rt = rt
        self.stores, self.retrieves, self.finished_calls = [], [], []
        self.report = SimpleNamespace(stores=[], retrieves=[])
        self.load_errors = []
        self.ready_calls = 0
        self.store_calls = []
        self.register_error = None
        self.get_finished_error = None
        self.shutdowns = 0
        self.store_polls = 1

    def register_kv_caches(self, layout, memfd=-1):
        if self.register_error:
            raise self.register_error

    def async_submit_store(self, spec):
        self.stores.append(spec)
        c = self.rt.add(FakeCall(SimpleNamespace(stored_chunks=1), polls=self.store_polls))
        self.store_calls.append(c)
        return c

    def async_submit_retrieve(self, spec):
        self.retrieves.append(spec)
        return self.rt.add(FakeCall(SimpleNamespace(retrieved_chunks=1)))

    def async_get_finished(self, ids):
        self.finished_calls.append(list(ids))
        if self.get_finished_error:
            e, self.get_finished_error = self.get_finished_error, None
            return self.rt.add(FakeCall(error=e))
        r, self.report = self.report, SimpleNamespace(stores=[], retrieves=[])
        return self.rt.add(FakeCall(r))

    def async_take_load_errors(self):
        e, self.load_errors = self.load_errors, []
        return self.rt.add(FakeCall(e))

    def ready(self):
        self.ready_calls += 1

    def shutdown(self):
        self.shutdowns += 1


def worker(**kw):
    rt = FakeRuntime()
    a = FakeWorker(rt)
    return WorkerCore(a, rt, settings(**kw), transfer_spec=SimpleNamespace), a, rt


def run_step(core, plan, finished=()):
    """One step of the worker, in vLLM's order."""
    core.bind(plan)
    core.start_load_kv()
    core.wait_for_save()
    return core.get_finished(set(finished))


def test_worker_starts_retrieves_and_stores_from_the_plan():
    core, a, _ = worker()
    core.bind(StepPlan(loads=[Transfer("r1", TOKENS[:64], [3, 4, 5, 6], skip_tokens=16)],
                       stores=[Transfer("r2", TOKENS[:32], [7, 8])]))
    core.start_load_kv()
    assert [vars(s) for s in a.retrieves] == [dict(request_id="r1", tokens=TOKENS[:64], block_ids=[3, 4, 5, 6],
                                                   skip_first_n_tokens=16)]
    assert a.stores == []  # stores wait for the forward pass
    core.wait_for_save()
    assert [vars(s) for s in a.stores] == [dict(request_id="r2", tokens=TOKENS[:32], block_ids=[7, 8],
                                                skip_first_n_tokens=0)]


def test_worker_reports_loads_and_the_stores_vllm_holds_blocks_for():
    core, a, _ = worker()
    core.bind(StepPlan(finished_ids={"r2", "r3"}, held_ids={"r2"}))
    a.report = SimpleNamespace(stores=["r2", "r3"], retrieves=["r1"])
    a.load_errors = [5, 6]
    # r3's blocks were not held (its stores read blocks vLLM freed after
    # waiting for them): reporting it would make vLLM free them again.
    assert core.get_finished({"r2", "r3"}) == ({"r2"}, {"r1"})
    assert a.finished_calls == [["r2", "r3"]]
    assert core.get_block_ids_with_load_errors() == {5, 6}
    assert core.get_block_ids_with_load_errors() == set()


def test_worker_tells_the_adapter_held_ids_until_reported_and_the_others_once():
    core, a, _ = worker()
    core.bind(StepPlan(finished_ids={"held", "other"}, held_ids={"held"}))
    assert core.get_finished({"held", "other"}) == (None, None)  # held's stores still run
    core.bind(StepPlan())
    # vLLM repeats the ids (async scheduling): they do not reach the adapter.
    assert core.get_finished({"held", "other", "stranger"}) == (None, None)
    a.report = SimpleNamespace(stores=["held"], retrieves=[])
    assert core.get_finished(set()) == ({"held"}, None)
    core.get_finished({"held"})
    assert a.finished_calls == [["held", "other"], ["held"], ["held"], []]


def test_worker_tells_held_ids_again_when_the_adapter_did_not_take_them():
    core, a, _ = worker()
    core.bind(StepPlan(finished_ids={"r1"}, held_ids={"r1"}))
    a.get_finished_error = Error("timed_out")
    assert core.get_finished({"r1"}) == (None, None)
    a.report = SimpleNamespace(stores=["r1"], retrieves=[])
    assert core.get_finished(set()) == ({"r1"}, None)
    assert a.finished_calls == [["r1"], ["r1"]]
    core.get_finished(set())
    assert a.finished_calls[-1] == []


def test_worker_keeps_a_late_get_finished_answer_for_the_next_step():
    core, a, rt = worker()
    core._answer_wait_s = 0.01
    core.bind(StepPlan(finished_ids={"r1"}, held_ids={"r1"}))
    a.report = SimpleNamespace(stores=["r1"], retrieves=["r2"])
    a.load_errors = [7, 8]
    rt.hold = True  # kvlink's thread stalls: no answer this step
    assert core.get_finished(set()) == (None, None)
    assert core.get_block_ids_with_load_errors() == set()
    rt.hold = False
    # The same calls' answers, not new calls: the adapter reported them once.
    assert core.get_finished(set()) == ({"r1"}, {"r2"})
    assert core.get_block_ids_with_load_errors() == {7, 8}
    assert a.finished_calls == [["r1"]]


def test_worker_waits_for_stores_of_preempted_requests_only():
    core, a, rt = worker()
    a.store_polls = 5  # done only if handle_preemptions keeps polling
    core.bind(StepPlan(stores=[Transfer("r1", TOKENS[:32], [0, 1]), Transfer("r2", TOKENS[:32], [2, 3])]))
    core.wait_for_save()
    r1, r2 = a.store_calls
    assert not r1.done() and not r2.done()
    rt.queue.remove(r2)  # r2's store stays in flight
    core.handle_preemptions({"r1"})
    assert r1.done() and not r2.done()


def test_worker_waits_for_preempted_stores_at_start_load_kv_too():
    core, a, rt = worker()
    a.store_polls = 5  # a store takes several polls
    run_step(core, StepPlan(stores=[Transfer("r1", TOKENS[:32], [0, 1]), Transfer("r2", TOKENS[:32], [2, 3])]))
    core.bind(StepPlan(preempted_ids=set()))
    core.start_load_kv()
    assert not any(c.done() for c in a.store_calls)  # nobody preempted: no wait
    core.bind(StepPlan(preempted_ids={"r1"}))
    core.start_load_kv()
    assert a.store_calls[0].done()


def test_worker_waits_for_every_store_when_vllm_does_not_say_who_was_preempted():
    core, a, rt = worker()
    a.store_polls = 5
    run_step(core, StepPlan(stores=[Transfer("r1", TOKENS[:32], [0, 1]), Transfer("r2", TOKENS[:32], [2, 3])]))
    core.bind(StepPlan(preempted_ids=None))
    core.start_load_kv()
    assert all(c.done() for c in a.store_calls)


def test_worker_preemption_wait_is_bounded(caplog):
    core, a, rt = worker(transfer_timeout_s=0.01)
    rt.hold = True  # the store never completes
    run_step(core, StepPlan(stores=[Transfer("r1", TOKENS[:32], [0, 1])]))
    import time
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="kvlink.connector"):
        core.handle_preemptions({"r1"})
    assert time.monotonic() - t0 < 2.0
    assert "did not end" in caplog.text


def test_worker_explicit_ready_opens_the_gate_at_the_first_step_with_work():
    core, a, _ = worker(gate_trigger="explicit_ready")
    run_step(core, StepPlan())
    assert a.ready_calls == 0
    run_step(core, StepPlan(stores=[Transfer("r1", TOKENS[:32], [0, 1])]))
    run_step(core, StepPlan(loads=[Transfer("r2", TOKENS[:32], [0, 1])]))
    assert a.ready_calls == 1
    core2, a2, _ = worker()  # register_ack: the adapter opens it
    run_step(core2, StepPlan(stores=[Transfer("r1", TOKENS[:32], [0, 1])]))
    assert a2.ready_calls == 0


def test_worker_registration_not_acknowledged_yet_is_not_an_error(caplog):
    core, a, _ = worker()
    a.register_error = Error("not_connected")
    with caplog.at_level(logging.INFO, logger="kvlink.connector"):
        core.register_kv_caches(object(), 3)
    assert "not acknowledged yet" in caplog.text
    a.register_error = Error("bad_request")
    with caplog.at_level(logging.ERROR, logger="kvlink.connector"):
        core.register_kv_caches(object(), 3)
    assert "refused" in caplog.text


def test_worker_shutdown_once():
    core, a, _ = worker()
    core.shutdown()
    core.shutdown()
    assert a.shutdowns == 1
