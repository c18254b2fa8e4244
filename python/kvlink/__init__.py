"""kvlink: the link between an LLM inference engine and its KV-cache server.

    rt = kvlink.Runtime()
    worker = kvlink.WorkerAdapter(rt, kvlink.WorkerConfig(endpoint="unix:/tmp/kvlink-0.sock", model="m"))
    cache = kvlink.CpuKvCache(kvlink.paged_layout(32, 1024, 16, 8, 128, 2))
    worker.register_kv_caches(cache.layout, cache.fd)

Every adapter call has three forms: blocking (`worker.submit_store(spec,
timeout=...)`, the GIL released while it waits), non-blocking
(`worker.async_submit_store(spec)` returns a `Call`, completed inside
`rt.poll()`), and asyncio (`await worker.async_submit_store(spec)`).
Failures raise `kvlink.Error` with `.code` and `.message`. docs/python.md
tells the whole story.
"""
from .errors import Error
from ._kvlink import (
    Call, Runtime, State, LookupMode, GateTrigger, HealthConfig, SchedulerConfig, WorkerConfig,
    SchedulerAdapter, WorkerAdapter, Event, LookupStatus, StoreResult, RetrieveResult, FinishedSets,
    TransferSpec, KvBackend, PagedOrder, LayerLocation, KvLayout, paged_layout, have_cuda,
)
from .kv import CpuKvCache, export_kv_cache
from . import aio

if have_cuda:
    from ._kvlink import EngineEvent

__all__ = [
    "Error", "Call", "Runtime", "State", "LookupMode", "GateTrigger", "HealthConfig", "SchedulerConfig",
    "WorkerConfig", "SchedulerAdapter", "WorkerAdapter", "Event", "LookupStatus", "StoreResult",
    "RetrieveResult", "FinishedSets", "TransferSpec", "KvBackend", "PagedOrder", "LayerLocation", "KvLayout",
    "paged_layout", "have_cuda", "CpuKvCache", "export_kv_cache", "aio",
] + (["EngineEvent"] if have_cuda else [])
