"""Whether each chain can serve, kept current: every worker of it heartbeats in Redis and
answers its ``grpc.health.v1`` check SERVING.

NOTE: every ``INTERVAL_S`` (every 50 ms while a chain is out of service: ``retry_after``) the
watch reads the registry (heartbeat keys expire ``TTL_S`` = 3 s after a worker's last beat) and
checks every worker's health (``HealthProbe``'s 1 s timeout each, all at once). A worker is
*down* when its heartbeat expired or ``MISSES`` checks in a row failed (an error, a timeout,
NOT_SERVING). So a killed worker (connection refused) is down within
about a second and a hung one (SIGSTOP: checks time out) within about three. A chain is
healthy while all its stage workers are up and every expert of its MoE layers has an expert
worker up that holds it. When a healthy chain has a worker down it is taken out of service
(``Router.fence``); when an unhealthy one has every worker up again it is put back
(``Router.revive``, on a task of its own per chain: a revive whose stages hang waits out its
timeout without stopping the watch of the other chains). The same checks keep the expert
placement live (``ExpertWatch.update``), so no worker is checked twice.

A worker missing from the registry while its health check answers SERVING is given
``UNREGISTERED_GRACE_S`` before it counts as down: that is Redis restarted empty, and the
worker's next heartbeat registers it again (a dead or frozen worker fails its checks too).
"""

from __future__ import annotations

import asyncio
import logging

from gateway.experts import ExpertWatch
from gateway.router import Router
from stagemesh.errors import StagemeshError
from stagemesh.mesh.placement import chain_replicas
from stagemesh.mesh.store import ExpertReplica, Store, stage_worker_id
from stagemesh.mesh.topology import Topology
from stagemesh.runtime.health import HealthProbe, retry_after

logger = logging.getLogger(__name__)

INTERVAL_S = 0.5
MISSES = 2
"""Failed health checks in a row after which a worker counts as down."""
UNREGISTERED_GRACE_S = 3.0


class ChainWatch:
    """Polls every worker of every chain and takes chains out of service and back (see the NOTE)."""

    def __init__(
        self, store: Store, router: Router, topology: Topology, probe: HealthProbe, experts: ExpertWatch | None = None
    ):
        self.store, self.router, self.probe = store, router, probe
        self.expert_watch = experts
        """The expert placement, kept live from this watch's own checks (None: experts in the stages)."""
        self.stages: dict[int, list[tuple[str, str]]] = {
            c.index: [(stage_worker_id(c.index, s.index), s.address) for s in c.stages] for c in topology.chains
        }
        """chain -> (worker id, address) of each stage worker."""
        self.experts: dict[int, list[ExpertReplica]] = {c.index: chain_replicas(c) for c in topology.chains}
        self._misses: dict[str, int] = {}
        self._unregistered: dict[str, float] = {}
        """Since when each worker that answers its checks is missing from the registry."""
        self._reviving: dict[int, asyncio.Task] = {}

    async def run(self) -> None:
        """Polls every ``INTERVAL_S``, and every ``retry_after`` while a chain is out of service: a
        restarted worker's chain is back within ~50 ms of its SERVING, not up to ``INTERVAL_S`` after."""
        loop = asyncio.get_running_loop()
        out_since: float | None = None
        while True:
            try:
                await self.poll()
            except StagemeshError as err:
                logger.warning("cannot read worker health: %s", err.message)
            now = loop.time()
            out_since = None if all(h.healthy for h in self.router.chains) else (out_since or now)
            await asyncio.sleep(INTERVAL_S if out_since is None else retry_after(now - out_since, INTERVAL_S))

    async def poll(self) -> None:
        """One round: the registry, every health check, then each chain's verdict acted on."""
        alive = {w.worker_id for w in await self.store.list_workers() if w.alive}
        workers = {wid: address for chain in self.stages for wid, address in self._workers(chain)}
        answers = await asyncio.gather(*(self.probe.serving(address) for address in workers.values()))
        for wid, ok in zip(workers, answers):
            self._misses[wid] = 0 if ok else self._misses.get(wid, 0) + 1
        if self.expert_watch is not None:
            await self.expert_watch.update(alive, dict(zip(workers, answers)))
        down = {wid: "no heartbeat" for wid in self._unregistered_too_long(workers, alive, dict(zip(workers, answers)))}
        down.update({wid: "health check failing" for wid in workers if self._misses[wid] >= MISSES and wid not in down})
        for handle in self.router.chains:
            missing = self.missing(handle.chain_id, down)
            if handle.healthy and missing:
                await self.router.fence(handle, handle.engine, "; ".join(f"{w}: {why}" for w, why in missing.items()))
            elif not handle.healthy and not missing and not self._revive_running(handle.chain_id):
                task = asyncio.create_task(self.router.revive(handle), name=f"revive-chain-{handle.chain_id}")
                self._reviving[handle.chain_id] = task

    def _unregistered_too_long(self, workers: dict[str, str], alive: set[str], serving: dict[str, bool]) -> list[str]:
        """Workers without a heartbeat, except those that answer SERVING and have been missing
        for less than the grace (Redis lost the registry; they register again)."""
        now = asyncio.get_running_loop().time()
        gone = []
        for wid in workers:
            if wid in alive:
                self._unregistered.pop(wid, None)
                continue
            since = self._unregistered.setdefault(wid, now)
            if not serving[wid] or now - since >= UNREGISTERED_GRACE_S:
                gone.append(wid)
        return gone

    def _revive_running(self, chain: int) -> bool:
        task = self._reviving.get(chain)
        return task is not None and not task.done()

    async def stop(self) -> None:
        """Cancel the revives still running."""
        for task in self._reviving.values():
            task.cancel()
        await asyncio.gather(*self._reviving.values(), return_exceptions=True)

    def missing(self, chain: int, down: dict[str, str]) -> dict[str, str]:
        """The workers down that keep ``chain`` from serving (why, by worker id); empty when it can serve."""
        missing = {wid: down[wid] for wid, _ in self.stages.get(chain, ()) if wid in down}
        replicas = self.experts.get(chain, [])
        held = {(layer, e) for r in replicas for layer, ids in r.experts.items() for e in ids}
        live = {(layer, e) for r in replicas if r.worker_id not in down for layer, ids in r.experts.items() for e in ids}
        if held - live:  # some expert has no replica up
            missing.update({r.worker_id: down[r.worker_id] for r in replicas if r.worker_id in down})
        return missing

    def _workers(self, chain: int) -> list[tuple[str, str]]:
        return [*self.stages[chain], *((r.worker_id, r.address) for r in self.experts.get(chain, ()))]
