"""The status document: chains from the gateway's engines, workers from the Redis registry.

Its typed keys are exactly those ``stagemesh.wire.codec.messages.status_to_pb`` accepts::

    {"model": str, "version": str,
     "chains":  [{"id", "healthy", "num_stages", "requests_served", "requests_running", "requests_waiting"}],
     "workers": [{"id", "role", "chain", "stage", "layers": [start, end], "experts": {"<layer>": [ids]}, "address", "pid",
                  "device", "healthy", "tp_size", "heartbeat_age_s",
                  "load": {...}}],   # WorkerLoad (stagemesh.mesh.figures), from the worker's figures
     "gateway": {...}}   # extra: travels in StatusResponse.json

``gateway`` holds what the proto has no field for: readiness, the deployment, the attached
frontends (name, pid, open requests, requests taken), and per chain
the scheduler's view (KV blocks reserved, micro-batches, steps in flight, failures) and its outages (times it
left service, and why it last did); ``documents``: whether the gateway checks the signatures of
what it reads from Redis, and the forged documents it refused (``stagemesh.mesh.signing``);
``alert``: why the mesh reads degraded although it serves (a forged document refused lately).
A chain's counts other than ``requests_served`` are those of its current engine (a chain back
from an outage gets a fresh one).

Step latency p50/p99 and the pipeline bubble are derived from the stages' busy intervals
(``gateway.stage_stats``); the rest of the load is the workers' own figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import stagemesh
from gateway.router import ChainHandle, Router
from gateway.stage_stats import bubble_fractions, step_latency_quantiles
from stagemesh.errors import StagemeshError
from stagemesh.mesh.figures import WorkerFigures, WorkerLoad, figures_of
from stagemesh.mesh.store import Store, WorkerInfo
from stagemesh.mesh.topology import Chain, Topology

ALERT_S = 600.0
"""How long after a forged document was refused the status reads degraded (``StatusReporter.alert``)."""


class StatusReporter:
    """Builds the status document on demand (one Redis round trip for workers and metrics)."""

    def __init__(self, store: Store, router: Router, topology: Topology):
        self.store = store
        self.router = router
        self.topology = topology
        self.ready = False
        """Every chain was built and the gateway serves (set by the gateway's startup)."""
        self.frontends: Callable[[], list[dict]] = list
        """The frontends attached now (``FrontendHub.frontends``, once the hub runs)."""
        self._last_beat: dict[str, float] = {}
        """worker id -> time of its last heartbeat seen, for the age of a worker whose figures expired."""

    async def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "model": Path(self.topology.model).name,
            "version": stagemesh.__version__,
            "chains": [self._chain(c) for c in self.topology.chains],
            "workers": [],
            "gateway": self._gateway(),
        }
        try:
            workers, metrics = await asyncio.gather(self.store.list_workers(), self.store.get_metrics())
        except StagemeshError as err:
            doc["gateway"]["error"] = f"worker list unavailable: {err.message}"
            return doc
        workers = [w for w in workers if w.role in ("stage", "expert")]
        bubbles = _bubbles(workers, [figures_of(w.role, metrics.get(w.worker_id, {})) for w in workers])
        doc["workers"] = [worker_status(w, self._figures(w, metrics), bubble=bubbles.get(w.worker_id, 0.0))
                          for w in workers]
        return doc

    def _figures(self, info: WorkerInfo, metrics: dict[str, dict[str, Any]]) -> WorkerFigures:
        """The worker's figures; once they expired (it stopped beating), only the time of its last beat."""
        figures = figures_of(info.role, metrics.get(info.worker_id, {}))
        if isinstance(figures.time, (int, float)):
            self._last_beat[info.worker_id] = figures.time
            return figures
        return replace(figures, time=self._last_beat.get(info.worker_id, info.started_at))

    def _chain(self, chain: Chain) -> dict[str, Any]:
        handle = self._handle(chain.index)
        status = {"id": chain.index, "healthy": False, "num_stages": len(chain.stages),
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
            "pid": os.getpid(),
            "deployment": self.store.deployment,
            "frontends": self.frontends(),
            "chains": [_scheduler_view(h) for h in self.router.chains],
            "documents": {"signed": self.store.signed, **self.store.refusals.to_json()},
            "alert": self.alert(),
        }

    def alert(self, now: float | None = None) -> str | None:
        """Why the mesh reads degraded though it may serve: a forged document in Redis refused in the
        last ``ALERT_S`` seconds (someone who can write to Redis is tampering); None otherwise."""
        refusals = self.store.refusals
        last = refusals.last
        if last is None or (age := (now or time.time()) - last.at) > ALERT_S:
            return None
        return (f"refused {sum(refusals.counts.values())} forged document(s) in Redis, the last a {last.kind} at "
                f"{last.key!r} {age:.0f} s ago ({last.why}); the mesh runs on its own signed copies, but something "
                f"that can write to Redis is tampering with it")

    def _handle(self, chain_id: int) -> ChainHandle | None:
        return next((h for h in self.router.chains if h.chain_id == chain_id), None)


def worker_status(info: WorkerInfo, figures: WorkerFigures, now: float | None = None, bubble: float = 0.0) -> dict:
    """One worker's entry: its registration, liveness, and load from its last heartbeat figures
    (and ``bubble``, its chain's pipeline bubble as this stage sees it).

    ``heartbeat_age_s`` comes from the figure ``time`` (Unix time of the beat) when the worker
    reports one, else it reads 0.
    """
    beat = figures.time
    age = max(0.0, (now or time.time()) - beat) if isinstance(beat, (int, float)) else 0.0
    return {
        "id": info.worker_id,
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
        "load": WorkerLoad.of(figures, step_latency_quantiles(figures.intervals), bubble).to_json(),
    }


def _bubbles(workers: list[WorkerInfo], figures: list[WorkerFigures], now: float | None = None) -> dict[str, float]:
    """Each stage's pipeline bubble (by worker id) from the busy intervals of every stage of its chain."""
    chains: dict[int | None, dict[str, list]] = {}
    for info, figs in zip(workers, figures):
        if info.role == "stage" and figs.to_json():  # a stage whose figures expired (gone) has no bubble
            chains.setdefault(info.chain, {})[info.worker_id] = figs.intervals
    return {wid: round(bubble, 4) for by_worker in chains.values()
            for wid, bubble in bubble_fractions(by_worker, now or time.time()).items()}


def _scheduler_view(handle: ChainHandle) -> dict[str, Any]:
    scheduler, counters = handle.engine.scheduler, handle.engine.counters
    return {
        "id": handle.chain_id,
        "stage_addresses": list(handle.stage_addresses),
        "kv_blocks_reserved": scheduler.kv_blocks_used,
        "kv_blocks_total": scheduler.config.num_blocks,
        "micro_batches": scheduler.config.num_slots,
        "steps_in_flight": scheduler.num_in_flight,
        "steps_done": counters.steps_done,
        "steps_failed": counters.steps_failed,
        "tokens_emitted": counters.tokens_emitted,
        "requests_failed": counters.requests_failed,
        "requests_aborted": counters.requests_aborted,
        "outages": handle.outages,
        "why_down": handle.why_down,
    }
