"""vLLM's KV connector for kvlink-server: `KvlinkConnector`.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvlinkConnector",
        "kv_connector_module_path": "kvlink.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"endpoint": "unix:/run/kvlink/kvlink.sock"}}'

A thin shell: it turns vLLM's objects into plain request ids, token lists
and block ids for kvlink.connector, where every decision is made (and
tested without vLLM). docs/vllm.md lists the settings and what each hook
does. This is the only kvlink module that imports vLLM.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)

import kvlink
from kvlink.connector import (CachedRequest, ConnectorSettings, NewRequest, SchedulerCore, SchedulerStep,
                              StepPlan, WorkerCore)

log = logging.getLogger("kvlink.vllm")


@dataclass
class KvlinkConnectorMetadata(KVConnectorMetadata):
    """One step's plan, from the scheduler's connector to every worker's."""
    plan: StepPlan


def _skip_reason(request) -> str:
    """Why a request's KV must not be shared through kvlink by its tokens alone, or ""."""
    if getattr(request, "mm_features", None) or getattr(request, "mm_hashes", None):
        return "multimodal input"      # placeholder tokens do not identify the image
    if getattr(request, "lora_request", None) is not None:
        return "LoRA adapter"          # the same tokens give other KV
    if getattr(request, "cache_salt", None):
        return "per-request cache_salt"
    if getattr(request, "prompt_token_ids", None) is None:
        return "prompt embeddings"
    return ""


def _first_group(block_ids) -> list[int]:
    """vLLM gives block ids per KV-cache group; kvlink handles one group."""
    if not block_ids:
        return []
    if isinstance(block_ids, tuple) or (isinstance(block_ids, list) and block_ids and
                                        isinstance(block_ids[0], (list, tuple))):
        return list(block_ids[0])
    return list(block_ids)


class KvlinkConnector(KVConnectorBase_V1):
    """KVConnectorBase_V1 over kvlink: prefix lookups in the scheduler,
    asynchronous loads and stores of full prompt chunks in the workers."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        if "kv_cache_config" in inspect.signature(KVConnectorBase_V1.__init__).parameters:
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        else:  # vLLM before the KV-cache config was passed
            super().__init__(vllm_config=vllm_config, role=role)
        model_config = vllm_config.model_config
        model = getattr(model_config, "served_model_name", None) or model_config.model
        if isinstance(model, (list, tuple)):
            model = model[0]
        self._block_size = vllm_config.cache_config.block_size
        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None) or {}
        self._settings = ConnectorSettings.from_extra_config(extra, block_size=self._block_size, model=str(model))
        parallel = vllm_config.parallel_config
        tp = parallel.tensor_parallel_size
        self._world_size = tp * parallel.pipeline_parallel_size
        self._num_planes = 1 if getattr(model_config, "use_mla", False) else 2
        self._runtime = kvlink.Runtime()
        self._sched: SchedulerCore | None = None
        self._worker: WorkerCore | None = None
        self._cuda = False
        if role == KVConnectorRole.SCHEDULER:
            adapter = kvlink.SchedulerAdapter(self._runtime, self._settings.scheduler_config(self._world_size))
            self._sched = SchedulerCore(adapter, self._runtime, self._settings, self._block_size)
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
            kv_rank = get_pp_group().rank_in_group * tp + get_tensor_model_parallel_rank()
            adapter = kvlink.WorkerAdapter(self._runtime, self._settings.worker_config(self._world_size, kv_rank))
            self._worker = WorkerCore(adapter, self._runtime, self._settings)
        log.info("KvlinkConnector (%s) for %s on %s, %d-token chunks", role.name.lower(), self._settings.model,
                 self._settings.endpoint, self._settings.chunk_size)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a store that does not happen is a later miss

    # ---- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if _skip_reason(request):
            return 0, False
        return self._sched.get_num_new_matched_tokens(request.request_id, request.all_token_ids,
                                                      num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        block_ids = _first_group(blocks.get_block_ids()) if num_external_tokens > 0 else []
        self._sched.update_state_after_alloc(request.request_id, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        so = scheduler_output
        new = [NewRequest(r.req_id, [] if _skip_reason(r) else list(r.prompt_token_ids),
                          _first_group(r.block_ids), r.num_computed_tokens, so.num_scheduled_tokens.get(r.req_id, 0))
               for r in so.scheduled_new_reqs]
        cached = so.scheduled_cached_reqs
        resumed_ids = getattr(cached, "resumed_req_ids", None)
        resumed_flags = getattr(cached, "resumed_from_preemption", None)  # vLLM before resumed_req_ids
        steps = []
        for i, rid in enumerate(cached.req_ids):
            resumed = rid in resumed_ids if resumed_ids is not None else bool(resumed_flags and resumed_flags[i])
            steps.append(CachedRequest(rid, _first_group(cached.new_block_ids[i]), cached.num_computed_tokens[i],
                                       so.num_scheduled_tokens.get(rid, 0), resumed))
        preempted = getattr(so, "preempted_req_ids", None)
        step = SchedulerStep(new, steps, set(preempted) if preempted is not None else None)
        return KvlinkConnectorMetadata(self._sched.build_connector_meta(step))

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched.request_finished(request.request_id), None

    # ---- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]):
        tensors = list(kv_caches.values())
        if not tensors or tensors[0].device.type != "cuda":
            log.error("KvlinkConnector moves KV caches on CUDA devices; vLLM's is on %s: kvlink is not used by "
                      "this worker (loads fail into recompute, nothing is stored)",
                      tensors[0].device if tensors else "no device")
            return
        try:
            layout = kvlink.export_kv_cache(tensors, num_planes=self._num_planes)
        except kvlink.Error as e:
            log.error("KvlinkConnector cannot export vLLM's KV cache (%s): kvlink is not used by this worker", e)
            return
        self._cuda = True
        self._worker.register_kv_caches(layout)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._worker.bind(connector_metadata.plan)

    def handle_preemptions(self, preempted):
        # vLLM passes the step's metadata, or (some versions) the preempted ids.
        if isinstance(preempted, KvlinkConnectorMetadata):
            self._worker.handle_preemptions(preempted.plan.preempted_ids)
        elif preempted:
            self._worker.handle_preemptions(set(preempted))

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: no request of this forward pass waits for one

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # whole chunks, every layer, are stored after the forward pass (wait_for_save)

    def wait_for_save(self):
        if self._cuda and self._worker_has_stores():
            import torch
            # The server's copy runs on its own stream in its own process:
            # the forward pass's KV writes must be done first.
            torch.cuda.current_stream().synchronize()
        self._worker.wait_for_save()

    def _worker_has_stores(self) -> bool:
        return self.has_connector_metadata() and bool(self._get_connector_metadata().plan.stores)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.shutdown()
        self._runtime.stop()
