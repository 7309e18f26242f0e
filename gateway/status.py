"""The status document: chains from the gateway's engines, workers from the Redis registry.

Its typed keys are exactly those ``stagemesh.codec.messages.status_to_pb`` accepts::

    {"model": str, "version": str,
     "chains":  [{"id", "healthy", "num_stages", "requests_served", "requests_running", "requests_waiting"}],
     "workers": [{"role", "chain", "stage", "layers": [start, end], "experts", "address", "pid",
                  "device", "healthy", "tp_size", "heartbeat_age_s",
                  "load": {"queue_depth", "running_sequences", "kv_blocks_used", "kv_blocks_total",
                           "busy_fraction", "tokens_processed"}}],
     "gateway": {...}}   # extra: travels in StatusResponse.json

``gateway`` holds what the proto has no field for: readiness, the deployment, and per chain
the scheduler's view (KV blocks reserved, steps in flight, failures).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import stagemesh
from stagemesh.errors import StagemeshError
from stagemesh.store import Store, WorkerInfo

from .router import ChainHandle, Router

_INT_LOAD = ("queue_depth", "running_sequences", "kv_blocks_used", "kv_blocks_total", "tokens_processed")
"""WorkerLoad fields read from the worker's heartbeat figures of the same name (``busy_fraction`` too)."""


class StatusReporter:
    """Builds the status document on demand (one Redis round trip for workers and metrics)."""

    def __init__(self, store: Store, router: Router, topology: dict[str, Any]):
        self.store = store
        self.router = router
        self.topology = topology
        self.ready = False
        """Every chain was built and the gateway serves (set by the gateway's startup)."""

    async def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "model": Path(self.topology.get("model", "")).name,
            "version": stagemesh.__version__,
            "chains": [self._chain(c) for c in self.topology.get("chains", ())],
            "workers": [],
            "gateway": self._gateway(),
        }
        try:
            workers, metrics = await asyncio.gather(self.store.list_workers(), self.store.get_metrics())
        except StagemeshError as err:
            doc["gateway"]["error"] = f"worker list unavailable: {err.message}"
            return doc
        doc["workers"] = [
            worker_status(w, metrics.get(w.worker_id, {})) for w in workers if w.role in ("stage", "expert")
        ]
        return doc

    def _chain(self, entry: dict[str, Any]) -> dict[str, Any]:
        handle = self._handle(entry["chain"])
        status = {"id": entry["chain"], "healthy": False, "num_stages": len(entry.get("stages", ())),
                  "requests_served": 0, "requests_running": 0, "requests_waiting": 0}
        if handle is not None:
            scheduler = handle.engine.scheduler
            status.update(
                healthy=handle.healthy,
                requests_served=handle.engine.counters.requests_finished,
                requests_running=scheduler.num_running,
                requests_waiting=scheduler.num_waiting,
            )
        return status

    def _gateway(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "deployment": self.store.deployment,
            "chains": [_scheduler_view(h) for h in self.router.chains],
        }

    def _handle(self, chain_id: int) -> ChainHandle | None:
        return next((h for h in self.router.chains if h.chain_id == chain_id), None)


def worker_status(info: WorkerInfo, figures: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """One worker's entry: its registration, liveness, and load from its last heartbeat figures.

    ``heartbeat_age_s`` comes from the figure ``time`` (Unix time of the beat) when the worker
    reports one, else it reads 0.
    """
    beat = figures.get("time")
    age = max(0.0, (now or time.time()) - beat) if isinstance(beat, (int, float)) else 0.0
    return {
        "role": info.role,
        "chain": -1 if info.chain is None else info.chain,
        "stage": -1 if info.stage is None else info.stage,
        "layers": [info.start_layer or 0, info.end_layer or 0],
        "experts": sorted({e for ids in info.experts.values() for e in ids}),
        "address": info.address,
        "pid": info.pid,
        "device": info.device,
        "healthy": info.alive,
        "tp_size": info.tp_size,
        "heartbeat_age_s": round(age, 3),
        "load": _load(figures),
    }


def _load(figures: dict[str, Any]) -> dict[str, Any]:
    """The WorkerLoad of a worker's figures; a figure it does not (yet) report reads 0."""
    load: dict[str, Any] = {name: int(_number(figures.get(name))) for name in _INT_LOAD}
    load["busy_fraction"] = float(_number(figures.get("busy_fraction")))
    return load


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) else 0


def _scheduler_view(handle: ChainHandle) -> dict[str, Any]:
    scheduler, counters = handle.engine.scheduler, handle.engine.counters
    return {
        "id": handle.chain_id,
        "stage_addresses": list(handle.stage_addresses),
        "kv_blocks_reserved": scheduler.kv_blocks_used,
        "kv_blocks_total": scheduler.config.num_blocks,
        "steps_in_flight": scheduler.num_in_flight,
        "steps_done": counters.steps_done,
        "steps_failed": counters.steps_failed,
        "tokens_emitted": counters.tokens_emitted,
        "requests_failed": counters.requests_failed,
        "requests_aborted": counters.requests_aborted,
    }
