"""An expert worker's part in the server lifecycle (``stagemesh.runtime.server.run``): its experts'
weights, its heartbeat with per-expert token counts, its drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import replace

from expert_worker.place import ExpertPlace
from expert_worker.servicer import ExpertServicer
from stagemesh.mesh.figures import ExpertFigures
from stagemesh.mesh.store import Store, WorkerInfo
from stagemesh.runtime.faults import FaultInjector, add_admin
from stagemesh.runtime.heartbeat import Heartbeat
from stagemesh.runtime.net import bind_address
from stagemesh.runtime.server import Role, WorkerServer
from stagemesh.runtime.startup import StartupError
from stagemesh.v1 import expert_pb2_grpc

log = logging.getLogger(__name__)


class ExpertWorker(Role):
    """One expert worker's part in the lifecycle (``stagemesh.runtime.server.run``): its experts' weights."""

    def __init__(self, args: argparse.Namespace, place: ExpertPlace, store: Store):
        self.args, self.place, self.store = args, place, store
        self.faults = FaultInjector(place.worker_id, getattr(args, "enable_fault_injection", False))
        """Fault injection through the Admin service (refused unless --enable-fault-injection)."""
        self.servicer = ExpertServicer(place, self.faults)
        self.heartbeat: Heartbeat | None = None

    async def load(self, server: WorkerServer) -> None:
        """Listen (NOT_SERVING), then load this worker's experts.

        NOTE: shielded: a stop signal ends the wait, not the load on the compute thread (``close`` joins it).
        """
        bind = bind_address(self.args.host, self.place.address)
        await server.start(bind, self._add_services)
        if self.faults.enabled:
            log.warning("expert worker %s: fault injection is ON (Admin.InjectFault); never in production",
                        self.place.name)
        log.info("loading experts %s", self.place.experts)
        try:
            await asyncio.shield(self.servicer.load())
        except Exception as err:  # noqa: BLE001 - reported as a startup failure
            raise StartupError(f"loading experts {self.place.experts} of {self.place.model} failed: {err}") from err

    def _add_services(self, server) -> None:
        expert_pb2_grpc.add_ExpertServicer_to_server(self.servicer, server)
        add_admin(server, self.faults)

    async def serve(self, server: WorkerServer) -> None:
        """SERVING, then registration and heartbeats."""
        await server.set_serving(True)
        self.heartbeat = Heartbeat(self.store, self._worker_info(), self._figures)
        self.heartbeat.start()
        log.info("expert worker %s serving experts %s on %s at %s", self.place.name, self.place.experts,
                 self.place.device, self.place.address)

    async def drain(self) -> None:
        """Leave the registry, then answer new batches UNAVAILABLE for ``--drain-s`` while stages learn it."""
        log.info("expert worker %s draining", self.place.name)
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        self.servicer.draining = True
        await asyncio.sleep(self.args.drain_s if self.heartbeat is not None else 0)

    async def close(self) -> None:
        await asyncio.to_thread(self.servicer.close)
        log.info("expert worker %s stopped", self.place.name)

    def _worker_info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.place.worker_id, role="expert", chain=self.place.chain, experts=self.place.experts,
            start_layer=min(self.place.experts, default=0), end_layer=max(self.place.experts, default=-1) + 1,
            address=self.place.address, device=self.place.device,
        )

    def _figures(self) -> dict:
        """The runner's figures, plus the queue and the weights, as JSON values."""
        runner = self.servicer.runner
        figures = runner.figures.report() if runner is not None else ExpertFigures()
        weight_bytes = runner.weight_bytes if runner is not None else 0
        return replace(figures, queue_depth=self.servicer.waiting, weight_bytes=weight_bytes).to_json()
