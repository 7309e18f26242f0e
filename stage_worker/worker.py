"""A stage worker's part in the server lifecycle (``stagemesh.runtime.server.run``): its weights,
its TP ranks, its next stage and expert workers, its heartbeat and its drain.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable

from stage_worker.build import StageOptions, build_runner
from stage_worker.neighbours import follow_neighbours, stage_neighbours
from stage_worker.pipeline import StagePipeline
from stage_worker.ranks import RankProcesses
from stage_worker.remote_experts import RemoteExperts
from stage_worker.servicer import StageServicer
from stage_worker.stage import LocalStage, TPStage, dead_rank_error, launch_tp
from stage_worker.topology import StagePlace
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.mesh.placement import chain_replicas
from stagemesh.mesh.store import Store, WorkerInfo
from stagemesh.runtime.faults import FaultInjector, add_admin
from stagemesh.runtime.heartbeat import Heartbeat
from stagemesh.runtime.load_progress import reporter
from stagemesh.runtime.net import bind_address
from stagemesh.runtime.server import Role, WorkerServer
from stagemesh.runtime.startup import StartupError
from stagemesh.runtime.tls import MeshTLS
from stagemesh.v1 import stage_pb2_grpc

log = logging.getLogger(__name__)

WATCH_S = 0.2
"""How often rank 0 polls its TP rank processes."""
FAILED_EXIT_GRACE_S = 3.0
"""After a TP rank died: how long the worker stays up, unhealthy and answering UNAVAILABLE, before it exits 1."""


def _exit_now(code: int) -> None:
    """Leave at once, without joining the step thread (it may be blocked in a collective for good)."""
    logging.shutdown()
    os._exit(code)


class StageWorker(Role):
    """One stage worker's part in the lifecycle (``stagemesh.runtime.server.run``): its weights,
    its TP ranks, its next stage and expert workers."""

    def __init__(self, args: argparse.Namespace, place: StagePlace, store: Store, tls: MeshTLS | None = None):
        self.args, self.place, self.store = args, place, store
        self.tls = tls
        """The stage's mesh identity: what its calls to the next stage and the expert workers present."""
        self.opts = StageOptions(
            kv_blocks=args.kv_blocks, kv_memory_mb=args.kv_memory_mb, threads=args.threads, cpus=args.cpus,
            tp_backend=args.tp_backend, log_level=args.log_level,
        )
        self.faults = FaultInjector(place.worker_id, getattr(args, "enable_fault_injection", False))
        """Fault injection through the Admin service (refused unless --enable-fault-injection)."""
        self.pipeline = StagePipeline(place, self.faults.seam, tls)
        self.servicer = StageServicer(self.pipeline, self.faults.streams)
        self.server: WorkerServer | None = None
        self.heartbeat: Heartbeat | None = None
        self.ranks: RankProcesses | None = None
        """TP ranks 1..T-1 (None when tp == 1)."""
        self.experts: RemoteExperts | None = None
        """The chain's expert workers, when the topology gives it some (else the experts are in the stage)."""
        self._placement: asyncio.Task | None = None
        self._neighbours: asyncio.Task | None = None
        """Keeps health SERVING only while the next stage serves (``stage_worker.neighbours``)."""

    async def load(self, server: WorkerServer) -> None:
        """Listen (NOT_SERVING), find the chain's expert workers, load the weights (every TP rank's).

        A stop signal cancels this; with TP ranks the process then leaves at once (``_leave_while_loading``).
        """
        self.server = server
        bind = bind_address(self.args.host, self.place.address)
        await server.start(bind, self._add_services)
        if self.faults.enabled:
            log.warning("stage %s: fault injection is ON (Admin.InjectFault); never in production", self.place.name)
        log.info("loading weights of stage %s", self.place.name)
        try:
            await self._find_experts()
            await self._load_weights()
        except asyncio.CancelledError:
            self._leave_while_loading(0)
            raise

    def _add_services(self, server) -> None:
        stage_pb2_grpc.add_StageServicer_to_server(self.servicer, server)
        add_admin(server, self.faults)

    async def _load_weights(self) -> None:
        """Build the stage on its step thread; a TP rank that dies meanwhile makes the process exit 1."""
        loading = asyncio.ensure_future(self.pipeline.load(self._stage_factory()))
        failing = asyncio.ensure_future(self.broken())
        try:
            await asyncio.wait([loading, failing], return_when=asyncio.FIRST_COMPLETED)
        finally:
            failing.cancel()
        if failing.done() and not failing.cancelled():
            log.error("stage %s cannot start: %s", self.place.name, failing.result().message)
            self._leave_while_loading(1)
        try:
            loading.result()
        except Exception as err:  # noqa: BLE001 - reported as a startup failure
            why = self._failure()
            raise StartupError(
                why.message if why else f"loading layers {self.place.spec.label} of {self.place.model} failed: {err}"
            ) from err

    def _stage_factory(self) -> Callable[[], LocalStage | TPStage]:
        """What the step thread calls to build the stage; with tp > 1 the TP ranks are started first."""
        if self.place.tp > 1:
            opts = dataclasses.replace(self.opts, remote_experts=self.experts is not None)
            self.ranks, make_stage = launch_tp(self.place, opts, self.experts, stopped_limit_s=self.args.liveness_s)
            return make_stage
        place, opts, experts = self.place, self.opts, self.experts
        progress = reporter(log, "layers")  # `stagemesh up` follows these lines (stagemesh.runtime.load_progress)
        return lambda: LocalStage(build_runner(place, opts, place.device, experts=experts, progress=progress),
                                  place.name)

    async def serve(self, server: WorkerServer) -> None:
        """SERVING while the next stage serves (``stage_worker.neighbours``), heartbeats, the experts'
        placement followed."""
        if self.experts is not None:
            self._placement = asyncio.create_task(self.experts.follow_placement(self.store, self.place.chain))
        self._neighbours = asyncio.create_task(follow_neighbours(stage_neighbours(self.place), server.set_serving,
                                                                self.tls))
        self.heartbeat = Heartbeat(self.store, self._worker_info(), self._figures)
        self.heartbeat.start()
        log.info("stage %s serving layers %s on %s at %s", self.place.name, self.place.spec.label,
                 ", ".join(self.place.devices), self.place.address)

    async def _find_experts(self) -> None:
        """The chain's expert workers from the topology (the gateway's placement in Redis then takes over)."""
        topology = await self.store.get_topology()
        replicas = chain_replicas(topology.chain(self.place.chain)) if topology is not None else []
        if replicas:
            self.experts = RemoteExperts(self.place.name, replicas, asyncio.get_running_loop(), tls=self.tls)
            log.info("stage %s routes its MoE layers' rows to expert workers %s", self.place.name,
                     [r.worker_id for r in replicas])

    def _leave_while_loading(self, code: int) -> None:
        """With TP ranks, leave at once: the step thread may be inside the ranks' rendezvous,
        which nothing interrupts; nothing is served or registered yet, so nothing is lost."""
        if self.ranks is not None:
            self.ranks.kill()
            _exit_now(code)

    async def broken(self) -> Unavailable:
        """Returns once the stage can never run a step again (a TP rank died); never for tp == 1."""
        while (failure := self._failure()) is None:
            await asyncio.sleep(WATCH_S)
        return failure

    def _failure(self) -> Unavailable | None:
        if self.pipeline.stage is not None:
            return self.pipeline.stage.failure()
        dead = self.ranks.first_dead() if self.ranks is not None else None
        return dead_rank_error(self.place.name, *dead) if dead else None

    async def fail(self, err: Unavailable) -> int:
        """Unhealthy at once, every step answered with ``err``; exit 1 after a short grace (never returns).

        NOTE: the exit is ``os._exit``: the step thread may be blocked for good in a collective
        with the dead rank (NCCL never gives up), and a normal exit would join it.
        """
        log.error("%s: stage %s is unhealthy and exits in %.0f s", err.message, self.place.name, FAILED_EXIT_GRACE_S)
        self._stop_following()
        await self.server.set_serving(False)
        self.pipeline.fail(err)
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=False)
        try:
            await asyncio.wait_for(self.store.mark_down(self.place.worker_id), FAILED_EXIT_GRACE_S)
        except (StagemeshError, asyncio.TimeoutError) as mark_err:
            log.warning("could not mark %s down in Redis: %s", self.place.worker_id, mark_err)
        await asyncio.sleep(FAILED_EXIT_GRACE_S)  # the answers reach their callers
        if self.ranks is not None:
            self.ranks.kill()
        _exit_now(1)

    async def drain(self) -> None:
        """Stop following the next stage, leave the registry, answer no new step."""
        log.info("stage %s draining", self.place.name)
        self._stop_following()
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        self.servicer.drain()

    async def close(self) -> None:
        """After ``server.stop(grace)``: the step thread, the stage, the expert links, the TP ranks."""
        await self.pipeline.close()
        if self._placement is not None:
            self._placement.cancel()
        if self.experts is not None:
            await self.experts.close()
        if self.ranks is not None:
            self.ranks.kill()  # those that did not stop (a stage that never finished loading)
        log.info("stage %s stopped", self.place.name)

    def _stop_following(self) -> None:
        if self._neighbours is not None:
            self._neighbours.cancel()

    def _worker_info(self) -> WorkerInfo:
        start, end = self.place.spec.bounds
        return WorkerInfo(
            worker_id=self.place.worker_id, role="stage", chain=self.place.chain, stage=self.place.stage,
            start_layer=start, end_layer=end, address=self.place.address,
            device=self.place.device, tp_size=self.place.tp,
        )

    def _figures(self) -> dict:
        """The pipeline's figures, plus each TP rank's pid and weight bytes, as JSON values."""
        figures = self.pipeline.figures.report(self.pipeline.runner)
        if self.pipeline.stage is not None:
            figures = dataclasses.replace(figures, **self.pipeline.stage.figures())
        if self.experts is not None:
            figures = dataclasses.replace(figures, **self.experts.figures())
        return figures.to_json()
