"""The expert placement, owned by the gateway: written to Redis from the topology, kept live.

At startup the gateway writes each chain's placement (which expert worker holds which
(layer, expert), every replica live) and waits until every expert worker's health answers
SERVING. Then, on every round of the chain health watch (``gateway.chain_health``, which
checks every worker anyway), a worker whose heartbeat lapsed in the registry or whose latest
health check failed has its replicas marked down, and marked up again when it is back.
Stages read the placement (``Store.get_placement``) and route rows only to live replicas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from stagemesh.errors import StagemeshError
from stagemesh.mesh.placement import chain_replicas
from stagemesh.mesh.store import ExpertReplica, Store
from stagemesh.mesh.topology import Topology
from stagemesh.runtime.health import HealthProbe, retry_after

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class ExpertWatch:
    """Every chain's expert workers: publishes their placement and keeps each one's liveness current."""

    def __init__(self, store: Store, topology: Topology, probe: HealthProbe):
        self.store, self.probe = store, probe
        self.replicas: dict[int, list[ExpertReplica]] = {
            c.index: rs for c in topology.chains if (rs := chain_replicas(c))
        }
        self.live: dict[str, bool] = {r.worker_id: True for rs in self.replicas.values() for r in rs}

    async def start(self) -> None:
        """Write the placement (all live) and wait until every expert worker serves."""
        for chain, replicas in self.replicas.items():
            await self.store.set_placement(chain, replicas)
        await self._wait_serving()
        logger.info("expert workers serving: %s", sorted(self.live))

    async def _wait_serving(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        next_log = start + LOG_EVERY_S
        while missing := [r.worker_id for r in self._all() if not await self.probe.serving(r.address)]:
            if loop.time() >= next_log:
                logger.info("still waiting for expert workers %s to serve", ", ".join(missing))
                next_log = loop.time() + LOG_EVERY_S
            await asyncio.sleep(retry_after(loop.time() - start, 0.5))

    async def update(self, alive: set[str], serving: dict[str, bool]) -> None:
        """Mark each replica up or down: its worker heartbeats (``alive``) and answered its latest
        health check (``serving``, by worker id)."""
        try:
            for chain, replica in self._by_chain():
                wid = replica.worker_id
                await self._mark(chain, wid, serving.get(wid, False) and wid in alive)
        except StagemeshError as err:
            logger.warning("cannot update the expert placement: %s", err.message)

    async def _mark(self, chain: int, worker_id: str, live: bool) -> None:
        if self.live[worker_id] != live:
            self.live[worker_id] = live
            try:
                await self.store.set_placement(chain, self.current(chain))
            except StagemeshError:
                self.live[worker_id] = not live  # tried again at the next round
                raise
            logger.warning("expert worker %s is %s: its replicas are marked %s", worker_id,
                           "back" if live else "DOWN", "up" if live else "down")

    def current(self, chain: int) -> list[ExpertReplica]:
        """Chain ``chain``'s replicas, each with its current liveness: the placement to publish."""
        return [dataclasses.replace(r, live=self.live[r.worker_id]) for r in self.replicas[chain]]

    def _all(self) -> list[ExpertReplica]:
        return [r for _, r in self._by_chain()]

    def _by_chain(self) -> list[tuple[int, ExpertReplica]]:
        return [(chain, r) for chain, rs in sorted(self.replicas.items()) for r in rs]
