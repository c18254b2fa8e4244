"""The vLLM connector's decisions, without vLLM.

`kvlink.vllm.KvlinkConnector` is a thin shell over the two classes here:

- `SchedulerCore` (vLLM's scheduler process): prefix lookups without
  blocking the scheduler, which tokens to load into which blocks, which
  full prompt chunks to store after each step, and whether a finished
  request's blocks must wait for its stores.
- `WorkerCore` (each vLLM worker): runs those plans through a
  `kvlink.WorkerAdapter` and reports finished transfers and blocks that
  failed to load.

Plain request ids, token lists and block ids go in; `StepPlan`s and
finished sets come out. Neither vLLM nor torch is imported here; the
adapters and runtime are passed in (fakes in the unit tests).

Why the plans look the way they do:

- Chunks are `chunk_size` tokens, a multiple of vLLM's block size, so a
  chunk always covers whole blocks.
- Only full prompt chunks are stored: a partial chunk or generated tokens
  would give keys no other prompt can hit.
- Loads are asynchronous (vLLM's WAITING_FOR_REMOTE_KVS): the request is
  not scheduled until its retrieve ended, and blocks that failed to load
  are recomputed by vLLM.
- Stores are asynchronous: they start after the step's forward pass and
  run while the next steps compute. A finished request with stores keeps
  its blocks until the worker adapter's fence says the server can no
  longer read them; a preempted request's blocks may be reused at once,
  so the worker waits for that request's stores before the next forward.
- A lookup, retrieve or store that fails or hangs ends by its deadline and
  costs recompute, never a stuck request.
"""

from __future__ import annotations

import logging
import select
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping

from .errors import Error

log = logging.getLogger("kvlink.connector")

_LOOKUP_MODES = ("two_phase", "sync")
_GATE_TRIGGERS = ("register_ack", "first_transfer", "explicit_ready")


# ---- settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectorSettings:
    """The connector's settings: the keys of vLLM's kv_connector_extra_config.

    Times are in seconds. `model` defaults to vLLM's served model name.
    """

    endpoint: str = "unix:/tmp/kvlink-0.sock"
    model: str = ""
    cache_salt: str = ""
    chunk_size: int = 256
    lookup_mode: str = "two_phase"
    gate_trigger: str = "register_ack"
    call_timeout_s: float = 5.0
    transfer_timeout_s: float = 5.0
    health_interval_s: float = 1.0
    ping_timeout_s: float = 1.0
    failure_threshold: int = 2
    success_threshold: int = 2
    connect_timeout_s: float = 1.0
    reconnect_max_s: float = 2.0
    max_warmup_s: float = 1800.0
    auth_token_file: str = ""

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None, *, block_size: int,
                          model: str = "") -> "ConnectorSettings":
        """Parses and checks kv_connector_extra_config; raises ValueError
        naming the key and what to do."""
        extra = dict(extra or {})
        defaults = cls()
        known = [f.name for f in fields(cls)]
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown key(s) {unknown} for KvlinkConnector; "
                             f"the keys are: {', '.join(known)}")
        values = {name: _typed(name, extra[name], type(getattr(defaults, name)))
                  for name in known if name in extra}
        settings = cls(**values)
        if not settings.model:
            settings = replace(settings, model=model)
        settings.check(block_size)
        return settings

    def check(self, block_size: int) -> None:
        """Raises ValueError for a setting kvlink cannot work with."""
        key = "kv_connector_extra_config"
        if not self.endpoint.startswith(("unix:", "tcp:")):
            raise ValueError(f"{key}.endpoint = {self.endpoint!r}: give unix:/path/to.sock or tcp:HOST:PORT "
                             "(the address kvlink-server listens on)")
        if not self.model:
            raise ValueError(f"{key}.model is empty: name the model (it keys the cache)")
        if block_size <= 0:
            raise ValueError(f"vLLM's block size is {block_size}; kvlink needs a positive block size")
        if self.chunk_size <= 0 or self.chunk_size % block_size != 0:
            raise ValueError(f"{key}.chunk_size = {self.chunk_size} is not a positive multiple of vLLM's block "
                             f"size {block_size}: set chunk_size to a multiple of {block_size} (e.g. "
                             f"{max(1, 256 // block_size) * block_size}) and start kvlink-server with the same "
                             "--chunk-size")
        if self.lookup_mode not in _LOOKUP_MODES:
            raise ValueError(f"{key}.lookup_mode = {self.lookup_mode!r}: use one of {', '.join(_LOOKUP_MODES)}")
        if self.gate_trigger not in _GATE_TRIGGERS:
            raise ValueError(f"{key}.gate_trigger = {self.gate_trigger!r}: use one of {', '.join(_GATE_TRIGGERS)}")
        for name in ("call_timeout_s", "transfer_timeout_s", "health_interval_s", "ping_timeout_s",
                     "connect_timeout_s", "reconnect_max_s", "max_warmup_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{key}.{name} = {getattr(self, name)}: give a time in seconds above 0")
        for name in ("failure_threshold", "success_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{key}.{name} = {getattr(self, name)}: give a count of at least 1")

    # Building the adapters' configs needs the compiled binding: imported here only.
    def health_config(self):
        import kvlink
        return kvlink.HealthConfig(interval=self.health_interval_s, ping_timeout=self.ping_timeout_s,
                                   failure_threshold=self.failure_threshold,
                                   success_threshold=self.success_threshold,
                                   connect_timeout=self.connect_timeout_s, reconnect_max=self.reconnect_max_s,
                                   max_warmup=self.max_warmup_s)

    def scheduler_config(self, world_size: int = 1):
        import kvlink
        # chunk_size 0: the adapters hash in the server's chunk size; the
        # cores check that it agrees with ours (see _chunk_size_agrees).
        return kvlink.SchedulerConfig(endpoint=self.endpoint, model=self.model, world_size=world_size,
                                      cache_salt=self.cache_salt, chunk_size=0,
                                      lookup_mode=getattr(kvlink.LookupMode, self.lookup_mode),
                                      call_timeout=self.call_timeout_s,
                                      blocking_deadline=self.call_timeout_s + 1.0,
                                      health=self.health_config(), auth_token_file=self.auth_token_file,
                                      name="vllm-kvlink-scheduler")

    def worker_config(self, world_size: int = 1, kv_rank: int = 0):
        import kvlink
        return kvlink.WorkerConfig(endpoint=self.endpoint, model=self.model, world_size=world_size,
                                   kv_rank=kv_rank, cache_salt=self.cache_salt, chunk_size=0,
                                   gate_trigger=getattr(kvlink.GateTrigger, self.gate_trigger),
                                   call_timeout=self.call_timeout_s, transfer_timeout=self.transfer_timeout_s,
                                   blocking_deadline=self.call_timeout_s + self.transfer_timeout_s + 1.0,
                                   health=self.health_config(), auth_token_file=self.auth_token_file,
                                   name=f"vllm-kvlink-worker-{kv_rank}")


def _typed(name: str, value: Any, kind: type) -> Any:
    where = f"kv_connector_extra_config.{name}"
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


# ---- what the scheduler sees and plans --------------------------------------------------


@dataclass
class NewRequest:
    """A request scheduled for the first time (or, in some vLLM versions, resumed)."""
    request_id: str
    prompt_tokens: list[int]
    block_ids: list[int]
    num_computed_tokens: int   # before this step
    num_scheduled_tokens: int  # computed by this step


@dataclass
class CachedRequest:
    """A request scheduled before. `resumed`: back from preemption, and
    `new_block_ids` replace its blocks instead of extending them."""
    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    resumed: bool = False


@dataclass
class SchedulerStep:
    """What build_connector_meta needs from vLLM's SchedulerOutput."""
    new_requests: list[NewRequest] = field(default_factory=list)
    cached_requests: list[CachedRequest] = field(default_factory=list)
    # Preempted in this step; None when vLLM does not say (then the worker
    # waits for every store in flight before the next forward pass).
    preempted_ids: set[str] | None = None


@dataclass
class Transfer:
    """One store or retrieve: the request's first len(tokens) tokens in
    block_ids (chunk after chunk, from token 0). A retrieve leaves the
    first skip_tokens tokens alone (vLLM has them already)."""
    request_id: str
    tokens: list[int]
    block_ids: list[int]
    skip_tokens: int = 0


@dataclass
class StepPlan:
    """The scheduler's plan for one step, carried to every worker."""
    loads: list[Transfer] = field(default_factory=list)
    stores: list[Transfer] = field(default_factory=list)
    preempted_ids: set[str] | None = field(default_factory=set)
    # request_finished since the last plan, each once (vLLM's own finished
    # ids may repeat). held_ids: those whose blocks vLLM holds until the
    # workers report their stores (request_finished returned True); only
    # these may be reported, vLLM fails on a report for blocks it freed.
    finished_ids: set[str] = field(default_factory=set)
    held_ids: set[str] = field(default_factory=set)

    def has_work(self) -> bool:
        return bool(self.loads or self.stores)


# ---- scheduler side ------------------------------------------------------------------


@dataclass
class _Lookup:
    tokens: list[int]
    started: float
    submit: Any                 # kvlink.Call of async_submit_lookup
    check: Any = None           # kvlink.Call of async_check_lookup in flight
    matched: int | None = None  # final answer, in tokens
    local: int = 0              # vLLM's own prefix hit when last asked
    consumed: bool = False      # update_state_after_alloc took the answer


@dataclass
class _SchedRequest:
    lookup: _Lookup | None = None
    ran_since_lookup: bool = False
    prompt: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    stored: int | None = None   # prompt tokens stored (or planned); None: not scheduled yet
    has_store: bool = False     # a store reads the current blocks: request_finished must hold them


class SchedulerCore:
    """Scheduler-side decisions. `adapter` is a kvlink.SchedulerAdapter (or
    a fake), `runtime` its kvlink.Runtime: calls complete in runtime.poll(),
    which the core runs at each entry point, on vLLM's scheduler thread."""

    def __init__(self, adapter, runtime, settings: ConnectorSettings, block_size: int):
        settings.check(block_size)
        self._adapter = adapter
        self._runtime = runtime
        self._chunk = settings.chunk_size
        self._block = block_size
        # The adapter finalizes a lookup within its call deadlines (submit,
        # then one poll); this bound only guards the request against a lost
        # answer.
        self._lookup_deadline = 2 * settings.call_timeout_s + 1.0
        self._reqs: dict[str, _SchedRequest] = {}
        self._pending_loads: list[Transfer] = []
        self._finished: set[str] = set()
        self._held: set[str] = set()
        self._mismatch_logged = False
        self._shut = False

    # vLLM: get_num_new_matched_tokens(request, num_computed_tokens)
    def get_num_new_matched_tokens(self, request_id: str, tokens: Iterable[int],
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond vLLM's own prefix hit that kvlink can load, and
        whether they load asynchronously: (None, False) while the lookup
        runs (vLLM asks again next step), (n, True) to load n tokens, (0,
        False) for nothing."""
        self._runtime.poll()
        if not self._chunk_size_agrees():
            return 0, False
        r = self._reqs.setdefault(request_id, _SchedRequest())
        if r.lookup is not None and r.lookup.consumed:
            if not r.ran_since_lookup:
                # Back in the queue without having run: its load failed
                # entirely. Compute it rather than loop on a broken load.
                return 0, False
            self._end_session(request_id)  # preempted: look up again, fresh locks
            r.lookup = None
            r.has_store = False  # the worker waited for its stores when it was preempted
        if r.lookup is None:
            tokens = list(tokens)
            r.lookup = _Lookup(tokens=tokens, started=time.monotonic(),
                               submit=self._adapter.async_submit_lookup(request_id, tokens))
            r.ran_since_lookup = False
        matched = self._advance(request_id, r.lookup)
        if matched is None:
            return None, False
        r.lookup.local = num_computed_tokens
        extra = max(0, matched - num_computed_tokens)
        return extra, extra > 0

    def _advance(self, request_id: str, lk: _Lookup) -> int | None:
        """The lookup's matched tokens once final, else None (and keeps it moving)."""
        if lk.matched is not None:
            return lk.matched
        if time.monotonic() - lk.started > self._lookup_deadline:
            log.warning("kvlink lookup of %s has no answer after %.1f s: computing it", request_id,
                        self._lookup_deadline)
            lk.matched = 0
            return 0
        if not lk.submit.done():
            return None
        if lk.check is not None:
            if not lk.check.done():
                return None
            call, lk.check = lk.check, None
            try:
                status = call.result()
            except Error as e:
                log.debug("kvlink check_lookup(%s): %s", request_id, e)
                lk.matched = 0
                return 0
            if status.ready:
                # Only full chunks match; never more than the tokens asked.
                lk.matched = min(status.matched_tokens, len(lk.tokens) // self._chunk * self._chunk)
                return lk.matched
        lk.check = self._adapter.async_check_lookup(request_id)
        return None

    # vLLM: update_state_after_alloc(request, blocks, num_external_tokens)
    def update_state_after_alloc(self, request_id: str, block_ids: list[int], num_external_tokens: int) -> None:
        """vLLM allocated the request's blocks; plan the load of the tokens
        it accepted, and release the locks of chunks it will not load."""
        r = self._reqs.get(request_id)
        if r is None or r.lookup is None or r.lookup.consumed or r.lookup.matched is None:
            return  # not looked up by us, or vLLM's second call after the load
        lk = r.lookup
        lk.consumed = True
        if num_external_tokens <= 0:
            if lk.matched > 0:
                self._free_locks(request_id, 0, lk.matched // self._chunk)
            return
        end = lk.local + num_external_tokens
        blocks = -(-end // self._block)
        if end > lk.matched or len(block_ids) < blocks:
            # vLLM asked for more than was matched, or gave too few blocks:
            # a retrieve would leave blocks vLLM believes loaded unfilled.
            raise ValueError(f"kvlink: request {request_id}: vLLM accepted {num_external_tokens} external "
                             f"tokens after {lk.local} local ones with {len(block_ids)} blocks, but "
                             f"{lk.matched} tokens matched")
        # A retrieve names the blocks from chunk 0 and skips what vLLM has;
        # it releases the lookup locks of every chunk it names.
        self._pending_loads.append(Transfer(request_id, lk.tokens[:end], list(block_ids[:blocks]),
                                            skip_tokens=lk.local))
        if lk.matched > end:
            self._free_locks(request_id, -(-end // self._chunk), lk.matched // self._chunk)

    # vLLM: build_connector_meta(scheduler_output)
    def build_connector_meta(self, step: SchedulerStep) -> StepPlan:
        """This step's plan: the loads accepted since the last plan, and a
        store of each scheduled request's prompt chunks completed by this
        step and not stored yet."""
        self._runtime.poll()
        plan = StepPlan(loads=self._pending_loads, preempted_ids=step.preempted_ids, finished_ids=self._finished,
                        held_ids=self._held)
        self._pending_loads, self._finished, self._held = [], set(), set()
        for rid in step.preempted_ids or ():
            if rid in self._reqs:
                self._reqs[rid].has_store = False  # its blocks are freed once the worker waited for its stores
        usable = self._chunk_size_agrees()
        for nr in step.new_requests:
            r = self._reqs.setdefault(nr.request_id, _SchedRequest())
            r.ran_since_lookup = True
            r.prompt = list(nr.prompt_tokens or [])
            r.block_ids = list(nr.block_ids)  # a resumed request comes here with all its blocks anew
            r.has_store = False
            if r.stored is None:
                # Chunks the server has (it just matched them) and vLLM kept
                # (a failed load lowered num_computed_tokens) need no store.
                matched = (r.lookup.matched or 0) if r.lookup else 0
                r.stored = min(matched, nr.num_computed_tokens) // self._chunk * self._chunk
            if usable:
                self._plan_store(nr.request_id, r, nr.num_computed_tokens + nr.num_scheduled_tokens, plan)
        for cr in step.cached_requests:
            r = self._reqs.get(cr.request_id)
            if r is None:
                continue  # never seen as new: not ours to store
            r.ran_since_lookup = True
            if cr.resumed:
                r.block_ids = list(cr.new_block_ids or [])
                r.has_store = False
            else:
                r.block_ids.extend(cr.new_block_ids or [])
            if usable:
                self._plan_store(cr.request_id, r, cr.num_computed_tokens + cr.num_scheduled_tokens, plan)
        return plan

    def _plan_store(self, request_id: str, r: _SchedRequest, computed: int, plan: StepPlan) -> None:
        full = min(computed, len(r.prompt)) // self._chunk * self._chunk
        if full <= (r.stored or 0):
            return
        blocks = full // self._block
        if len(r.block_ids) < blocks:
            log.error("kvlink: request %s has %d blocks for %d computed prompt tokens; not storing it",
                      request_id, len(r.block_ids), full)
            return
        plan.stores.append(Transfer(request_id, r.prompt[:full], r.block_ids[:blocks]))
        r.stored = full
        r.has_store = True

    # vLLM: request_finished(request, block_ids)
    def request_finished(self, request_id: str) -> bool:
        """True: the request's blocks must wait until the workers report its
        stores finished (get_finished's first set); the next plan says so."""
        self._runtime.poll()
        r = self._reqs.pop(request_id, None)
        if r is None:
            return False
        if r.lookup is not None:
            self._end_session(request_id)
        self._finished.add(request_id)
        if r.has_store:
            self._held.add(request_id)
        return r.has_store

    def shutdown(self) -> None:
        if not self._shut:
            self._shut = True
            self._adapter.stop()

    def _chunk_size_agrees(self) -> bool:
        # The server hashes and copies in its own chunk size: with another
        # one nothing would ever match, and every transfer would be refused.
        server = getattr(self._adapter, "chunk_size", 0) or 0
        if server == 0 or server == self._chunk:
            return True
        if not self._mismatch_logged:
            log.error("kvlink-server uses %d-token chunks but kv_connector_extra_config.chunk_size is %d: the "
                      "KV cache server is not used until they agree", server, self._chunk)
            self._mismatch_logged = True
        return False

    def _free_locks(self, request_id: str, start: int, end: int) -> None:
        if start >= end:
            return
        try:
            self._adapter.free_lookup_locks(request_id, start, end)
        except Error as e:  # dropped while degraded: the locks expire on the server
            log.debug("kvlink free_lookup_locks(%s): %s", request_id, e)

    def _end_session(self, request_id: str) -> None:
        try:
            self._adapter.end_session(request_id)
        except Error as e:  # degraded: dropped, but the adapter forgot the lookup anyway
            log.debug("kvlink end_session(%s): %s", request_id, e)


# ---- worker side ---------------------------------------------------------------------


class WorkerCore:
    """Worker-side execution of the plans, in vLLM's order: bind(plan),
    handle_preemptions, start_load_kv, (forward pass), wait_for_save,
    get_finished, get_block_ids_with_load_errors. `adapter` is a
    kvlink.WorkerAdapter (or a fake), `runtime` its kvlink.Runtime; all
    calls on one thread. `transfer_spec` builds the adapter's specs
    (kvlink.TransferSpec)."""

    def __init__(self, adapter, runtime, settings: ConnectorSettings, transfer_spec=None):
        if transfer_spec is None:
            import kvlink
            transfer_spec = kvlink.TransferSpec
        self._adapter = adapter
        self._runtime = runtime
        self._transfer_spec = transfer_spec
        self._explicit_ready = settings.gate_trigger == "explicit_ready"
        self._gate_opened = False
        # A transfer's call ends by transfer_timeout (or the call deadline
        # for one not sent); the margin covers the io thread's scheduling.
        self._store_wait_s = settings.transfer_timeout_s + 1.0
        self._stores: dict[str, list[Any]] = {}  # request id -> store Calls not done yet
        self._retrieves: list[Any] = []         # retrieve Calls not done yet (kept until they complete)
        self._load_errors: set[int] = set()
        self._held: set[str] = set()             # finished, blocks held by vLLM until reported
        self._closing: set[str] = set()          # finished, not held: told to the adapter once
        self._asked_closing: set[str] = set()    # ...in the get_finished call in flight
        # get_finished and take_load_errors in flight, kept across steps
        # until answered: an answer dropped would lose a report for good.
        self._finished_call = None
        self._load_errors_call = None
        self._answer_wait_s = 0.5
        self._plan = StepPlan()
        self._shut = False

    # vLLM: register_kv_caches(kv_caches)
    def register_kv_caches(self, layout, memfd: int = -1) -> None:
        """Hands the KV cache to the adapter, which keeps it and registers
        it with every server that lacks it (engine before server included)."""
        try:
            self._adapter.register_kv_caches(layout, memfd)
        except Error as e:
            if e.code == "bad_request":
                log.error("kvlink-server refused the KV cache registration (%s): every load and store will fail "
                          "and vLLM computes everything itself", e)
            else:
                log.info("KV cache registration not acknowledged yet (%s); kvlink sends it when the server can "
                         "take it", e)

    # vLLM: handle_preemptions(...) and the start of start_load_kv
    def handle_preemptions(self, request_ids: Iterable[str] | None) -> None:
        """Returns once the server can no longer read the blocks of these
        requests' stores (None: of every store), so vLLM may reuse them."""
        self._poll()
        ids = list(self._stores) if request_ids is None else [i for i in request_ids if i in self._stores]
        pending = [c for i in ids for c in self._stores.get(i, ())]
        if pending and not self._wait(pending, self._store_wait_s):
            log.error("kvlink stores of preempted requests %s did not end within %.1f s", ids, self._store_wait_s)

    # vLLM: bind_connector_metadata(metadata)
    def bind(self, plan: StepPlan) -> None:
        """This step's plan, bound before anything else of the step."""
        self._plan = plan
        self._held |= plan.held_ids
        self._closing |= plan.finished_ids - plan.held_ids
        # explicit_ready: the gate opens when vLLM starts serving (the first
        # step with work), however long model loading and warmup took.
        if self._explicit_ready and not self._gate_opened and plan.has_work():
            self._gate_opened = True
            self._adapter.ready()

    # vLLM: start_load_kv(forward_context)
    def start_load_kv(self) -> None:
        """Starts the plan's retrieves; their requests are not in this
        step's forward pass (vLLM waits for get_finished's second set).
        First waits for the stores of requests preempted in this step, in
        case vLLM did not call handle_preemptions."""
        self.handle_preemptions(self._plan.preempted_ids)
        for t in self._plan.loads:
            self._retrieves.append(self._adapter.async_submit_retrieve(self._spec(t)))

    # vLLM: wait_for_save()
    def wait_for_save(self) -> None:
        """Starts the plan's stores: this step's forward pass wrote their
        blocks. They end in the background; get_finished reports them."""
        for t in self._plan.stores:
            self._stores.setdefault(t.request_id, []).append(self._adapter.async_submit_store(self._spec(t)))

    # vLLM: get_finished(finished_req_ids)
    def get_finished(self, finished_ids: Iterable[str] = ()) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose stores finished, requests whose loads finished).

        Stores: a request is reported once, when the adapter's fence says
        the server can no longer read its blocks, and only if vLLM holds its
        blocks for this report (the plan's held_ids, which vLLM also lists
        among this step's finished ids). The adapter learns of finished
        requests from the plans, not from vLLM's finished ids: those may
        repeat under async scheduling, and a repeat reaching the adapter
        after the id was reused would end the new request's stores early.
        Loads: reported as soon as they ended, failed blocks in
        get_block_ids_with_load_errors."""
        del finished_ids  # the plans carry them, once each (see above)
        self._poll()
        if self._finished_call is None:
            # Held ids until reported; the others once, so that the adapter
            # closes their stores' bookkeeping (reports of them are dropped).
            self._finished_call = self._adapter.async_get_finished(sorted(self._held | self._closing))
            self._asked_closing, self._closing = self._closing, set()
        if self._load_errors_call is None:
            self._load_errors_call = self._adapter.async_take_load_errors()
        # Both are bookkeeping on kvlink's thread, answered in microseconds.
        # An answer that is late (that thread stalled) is not dropped: it is
        # taken at the next step, since the adapter reports each id once.
        if not self._wait([self._finished_call, self._load_errors_call], self._answer_wait_s):
            log.warning("kvlink get_finished: no answer within %.1f s; taking it at the next step",
                        self._answer_wait_s)
            return None, None
        finished, self._finished_call = self._finished_call, None
        load_errors, self._load_errors_call = self._load_errors_call, None
        try:
            self._load_errors.update(load_errors.result())
        except Error as e:
            log.error("kvlink take_load_errors: %s", e)
        try:
            fin = finished.result()
        except Error as e:
            log.warning("kvlink get_finished: %s; trying again next step", e)
            self._closing |= self._asked_closing
            return None, None
        sending = self._held.intersection(fin.stores)
        self._held -= sending
        return sending or None, set(fin.retrieves) or None

    # vLLM: get_block_ids_with_load_errors()
    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # vLLM: shutdown()
    def shutdown(self) -> None:
        """Unregisters the KV cache (bounded by call_timeout) and stops the link."""
        if self._shut:
            return
        self._shut = True
        try:
            self._adapter.shutdown()
        except Error as e:
            log.warning("kvlink worker shutdown: %s", e)

    def _spec(self, t: Transfer):
        return self._transfer_spec(request_id=t.request_id, tokens=list(t.tokens), block_ids=list(t.block_ids),
                                   skip_first_n_tokens=t.skip_tokens)

    def _poll(self) -> None:
        """Runs completions and forgets finished calls (their outcome is in
        the adapter's get_finished and load-error bookkeeping)."""
        self._runtime.poll()
        for rid in list(self._stores):
            left = [c for c in self._stores[rid] if not c.done()]
            if left:
                self._stores[rid] = left
            else:
                del self._stores[rid]
        self._retrieves = [c for c in self._retrieves if not c.done()]

    def _wait(self, calls: list[Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._poll()
            if all(c.done() for c in calls):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # host_fd is readable while completions wait for poll().
            select.select([self._runtime.host_fd()], [], [], min(left, 0.05))
