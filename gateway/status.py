"""The status document: chains from the gateway's engines, workers from the Redis registry.

Its typed keys are exactly those ``stagemesh.wire.codec.messages.status_to_pb`` accepts::

    {"model": str, "version": str,
     "chains":  [{"id", "healthy", "num_stages", "requests_served", "requests_running", "requests_waiting"}],
     "workers": [{"role", "chain", "stage", "layers": [start, end], "experts": {"<layer>": [ids]}, "address", "pid",
                  "device", "healthy", "tp_size", "heartbeat_age_s",
                  "load": {"queue_depth", "running_sequences", "kv_blocks_used", "kv_blocks_total",
                           "busy_fraction", "tokens_processed", "step_latency_p50_s", "step_latency_p99_s",
                           "micro_batches_per_s", "tokens_per_s", "bubble_fraction", "bytes_sent",
                           "expert_tokens": {"<layer>:<expert>": rows} (expert workers only)}}],
     "gateway": {...}}   # extra: travels in StatusResponse.json

``gateway`` holds what the proto has no field for: readiness, the deployment, and per chain
the scheduler's view (KV blocks reserved, steps in flight, failures) and its outages (times it
left service, and why it last did). A chain's counts other than ``requests_served`` are those of
its current engine (a chain back from an outage gets a fresh one).

Step latency p50/p99 and the pipeline bubble are derived from the stages' ``busy_intervals``
(``gateway.stage_stats``); the rates and ``bytes_sent`` are the stages' own figures.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import stagemesh
from gateway.router import ChainHandle, Router
from gateway.stage_stats import bubble_fractions, step_latency_quantiles
from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import Store, WorkerInfo

_INT_LOAD = ("queue_depth", "running_sequences", "kv_blocks_used", "kv_blocks_total", "tokens_processed", "bytes_sent")
_FLOAT_LOAD = ("busy_fraction", "micro_batches_per_s", "tokens_per_s")
"""WorkerLoad fields read from the worker's heartbeat figures of the same name."""


class StatusReporter:
    """Builds the status document on demand (one Redis round trip for workers and metrics)."""

    def __init__(self, store: Store, router: Router, topology: dict[str, Any]):
        self.store = store
        self.router = router
        self.topology = topology
        self.ready = False
        """Every chain was built and the gateway serves (set by the gateway's startup)."""
        self._last_beat: dict[str, float] = {}
        """worker id -> time of its last heartbeat seen, for the age of a worker whose figures expired."""

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
        workers = [w for w in workers if w.role in ("stage", "expert")]
        doc["workers"] = [worker_status(w, self._figures(w, metrics)) for w in workers]
        _fill_bubbles(doc["workers"], [metrics.get(w.worker_id, {}) for w in workers])
        return doc

    def _figures(self, info: WorkerInfo, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The worker's figures; once they expired (it stopped beating), only the time of its last beat."""
        figures = metrics.get(info.worker_id)
        if figures and isinstance(figures.get("time"), (int, float)):
            self._last_beat[info.worker_id] = figures["time"]
        return figures or {"time": self._last_beat.get(info.worker_id, info.started_at)}

    def _chain(self, entry: dict[str, Any]) -> dict[str, Any]:
        handle = self._handle(entry["chain"])
        status = {"id": entry["chain"], "healthy": False, "num_stages": len(entry.get("stages", ())),
                  "requests_served": 0, "requests_running": 0, "requests_waiting": 0}
        if handle is not None:
            scheduler = handle.engine.scheduler
            status.update(
                healthy=handle.healthy,
                requests_served=handle.requests_served,
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
        "experts": {str(layer): list(ids) for layer, ids in sorted(info.experts.items())},
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
    load.update({name: float(_number(figures.get(name))) for name in _FLOAT_LOAD})
    load["step_latency_p50_s"], load["step_latency_p99_s"] = step_latency_quantiles(_intervals(figures))
    load["bubble_fraction"] = 0.0  # set per chain by _fill_bubbles
    tokens = figures.get("expert_tokens")
    if isinstance(tokens, dict) and tokens:  # expert workers: rows per "layer:expert"
        load["expert_tokens"] = {key: int(_number(n)) for key, n in tokens.items()}
    return load


def _fill_bubbles(workers: list[dict[str, Any]], figures: list[dict[str, Any]], now: float | None = None) -> None:
    """Set each stage's ``bubble_fraction`` from the busy intervals of every stage of its chain."""
    chains: dict[int, dict[int, list]] = {}
    for n, (worker, figs) in enumerate(zip(workers, figures)):
        if worker["role"] == "stage" and figs:  # a stage whose figures expired (gone) has no bubble
            chains.setdefault(worker["chain"], {})[n] = _intervals(figs)
    for by_worker in chains.values():
        for n, bubble in bubble_fractions(by_worker, now or time.time()).items():
            workers[n]["load"]["bubble_fraction"] = round(bubble, 4)


def _intervals(figures: dict[str, Any]) -> list:
    value = figures.get("busy_intervals")
    return value if isinstance(value, list) else []


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
        "outages": handle.outages,
        "why_down": handle.why_down,
    }
