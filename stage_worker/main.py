"""Startup and shutdown of one stage worker process (``python -m stage_worker``).

Startup: Redis, the topology (waited for a few seconds), this worker's place in it, the gRPC
server with health NOT_SERVING, the weights (loaded off the event loop), health SERVING once
the next stage serves too (``stage_worker.neighbours``), then registration and heartbeats in
Redis. Shutdown on SIGTERM / SIGINT: health NOT_SERVING, leave
the registry, stop taking requests and answer those taken, ``server.stop(grace)``, exit 0.
Exit 1 when the worker cannot start (the log line says why).

With ``tp > 1`` in its topology entry this process is rank 0 of the stage: it starts ranks
1..T-1 (``stage_worker.tp_rank``) before loading, and watches them. When one dies, the stage
can never run a step again: health NOT_SERVING, down in the registry, every step answered
``UNAVAILABLE: tp rank R of stage cC-sS died ...``, and after a short grace, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stage_worker.build import StageOptions, build_runner
from stage_worker.downstream import MESSAGE_OPTIONS
from stage_worker.neighbours import follow_neighbours, stage_neighbours
from stage_worker.pipeline import StagePipeline
from stage_worker.ranks import RankProcesses
from stage_worker.remote_experts import RemoteExperts
from stage_worker.servicer import StageServicer
from stage_worker.stage import LocalStage, dead_rank_error, launch_tp
from stage_worker.topology import StagePlace, default_host, find_stage, port_of
from stage_worker.tp import check_devices
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.mesh.layout import validate_layout
from stagemesh.mesh.placement import chain_replicas
from stagemesh.mesh.store import Store, WorkerInfo
from stagemesh.runtime import cpus
from stagemesh.runtime.heartbeat import Heartbeat
from stagemesh.runtime.startup import StartupError, start_worker
from stagemesh.v1 import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

SERVER_OPTIONS = (
    *MESSAGE_OPTIONS,
    # Callers keep one stream open for hours and ping it (keepalive) while it idles: allow that.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)
STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
WATCH_S = 0.2
"""How often rank 0 polls its TP rank processes."""
FAILED_EXIT_GRACE_S = 3.0
"""After a TP rank died: how long the worker stays up, unhealthy and answering UNAVAILABLE, before it exits 1."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stage_worker", description="Run one pipeline stage of a stagemesh chain."
    )
    p.add_argument("--redis-url", required=True, help="Redis holding the topology, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--chain", type=int, required=True, help="data-parallel chain of this stage")
    p.add_argument("--stage", type=int, required=True, help="pipeline stage index within the chain")
    p.add_argument("--deployment", default="default", help="deployment name (Redis key namespace)")
    p.add_argument("--host", help="interface to bind (default: the topology address's host if loopback, else [::])")
    p.add_argument("--threads", type=int, help="torch intra-op threads of each rank (torch.set_num_threads)")
    p.add_argument("--cpus", type=cpus.arg, help="cores of this stage, e.g. 0-3: TP rank r binds to the r-th --threads of them")
    p.add_argument("--kv-blocks", type=int, help="KV-cache blocks (overrides the topology's kv_blocks)")
    p.add_argument("--kv-memory-mb", type=int, help="KV-cache budget in MiB when no block count is given")
    p.add_argument("--tp-backend", choices=["nccl", "gloo"],
                   help="TP ranks' torch.distributed backend (default: the topology's, else nccl on cuda, gloo on cpu)")
    p.add_argument("--topology-wait-s", type=float, default=10.0, help="how long to wait for Redis and the topology")
    p.add_argument("--grace-s", type=float, default=5.0, help="on SIGTERM, how long in-flight streams may finish")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s stage-c{args.chain}-s{args.stage} %(name)s: %(message)s",
    )
    try:
        cpus.take(args.cpus, 0, args.threads)
        return asyncio.run(_run(args))
    except StartupError as err:
        log.error("stage c%d-s%d cannot start: %s", args.chain, args.stage, err)
        return 1


async def _run(args: argparse.Namespace) -> int:
    async def serve(place: StagePlace, store: Store) -> int:
        _check_layout(place)
        return await StageWorker(args, place, store).serve()

    return await start_worker(
        args.redis_url, args.deployment, args.topology_wait_s, lambda doc: find_stage(doc, args.chain, args.stage), serve
    )


def _check_layout(place: StagePlace) -> None:
    """The layout checks of `stagemesh up`, made again here against this host's devices."""
    try:
        validate_layout(ModelConfig.from_dir(place.model), place.num_stages, place.tp)
        check_devices(place.devices)
    except ValueError as err:
        raise StartupError(f"stage {place.name} cannot run as the topology places it: {err}") from err


def _exit_now(code: int) -> None:
    """Leave at once, without joining the step thread (it may be blocked in a collective for good)."""
    logging.shutdown()
    os._exit(code)


class StageWorker:
    """One stage worker's lifetime: serve until SIGTERM / SIGINT, then drain."""

    def __init__(self, args: argparse.Namespace, place: StagePlace, store: Store):
        self.args, self.place, self.store = args, place, store
        self.opts = StageOptions(
            kv_blocks=args.kv_blocks, kv_memory_mb=args.kv_memory_mb, threads=args.threads, cpus=args.cpus,
            tp_backend=args.tp_backend, log_level=args.log_level,
        )
        self.pipeline = StagePipeline(place)
        self.servicer = StageServicer(self.pipeline)
        self.health = health.aio.HealthServicer()
        self.heartbeat: Heartbeat | None = None
        self.ranks: RankProcesses | None = None
        """TP ranks 1..T-1 (None when tp == 1)."""
        self.experts: RemoteExperts | None = None
        """The chain's expert workers, when the topology gives it some (else the experts are in the stage)."""
        self._placement: asyncio.Task | None = None
        self._neighbours: asyncio.Task | None = None
        """Keeps health SERVING only while the next stage serves (``stage_worker.neighbours``)."""

    async def serve(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await self._start_server()
        try:
            await self._find_experts()
            if not await self._load(stop):
                return 0
            if self.experts is not None:
                self._placement = asyncio.create_task(self.experts.follow_placement(self.store, self.place.chain))
            self._neighbours = asyncio.create_task(follow_neighbours(stage_neighbours(self.place), self._set_serving))
            self.heartbeat = Heartbeat(self.store, self._worker_info(), self._figures)
            self.heartbeat.start()
            log.info("stage %s serving layers %s on %s at %s", self.place.name, self.place.spec.label,
                     ", ".join(self.place.devices), self.place.address)
            stopping, failing = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._watch())
            await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            failing.cancel()
            if failing.done() and not failing.cancelled():
                await self._fail(failing.result())
            return 0
        finally:
            await self._shutdown(server)

    async def _start_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        stage_pb2_grpc.add_StageServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(NOT_SERVING)
        bind = f"{self.args.host or default_host(self.place.address)}:{port_of(self.place.address)}"
        try:
            if server.add_insecure_port(bind) == 0:
                raise RuntimeError("port unavailable")
        except RuntimeError as err:
            raise StartupError(f"cannot listen on {bind} ({err}); is another process using the port?") from err
        await server.start()
        log.info("listening on %s; loading weights", bind)
        return server

    async def _load(self, stop: asyncio.Event) -> bool:
        """Load the weights (every TP rank's); False when a stop signal came first."""
        if self.place.tp > 1:
            opts = dataclasses.replace(self.opts, remote_experts=self.experts is not None)
            self.ranks, make_stage = launch_tp(self.place, opts, self.experts)
        else:
            def make_stage() -> LocalStage:
                runner = build_runner(self.place, self.opts, self.place.device, experts=self.experts)
                return LocalStage(runner, self.place.name)
        loading = asyncio.ensure_future(self.pipeline.load(make_stage))
        stopping, failing = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._watch())
        await asyncio.wait([loading, stopping, failing], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failing.cancel()
        if failing.done() and not failing.cancelled():
            log.error("stage %s cannot start: %s", self.place.name, failing.result().message)
            self._leave_while_loading(1)
        if not loading.done():
            log.info("stop requested while loading weights")
            self._leave_while_loading(0)
            return False
        try:
            loading.result()
        except Exception as err:  # noqa: BLE001 - reported as a startup failure
            why = self._failure()
            raise StartupError(
                why.message if why else f"loading layers {self.place.spec.label} of {self.place.model} failed: {err}"
            ) from err
        return True

    async def _find_experts(self) -> None:
        """The chain's expert workers from the topology (the gateway's placement in Redis then takes over)."""
        replicas = chain_replicas(await self.store.get_topology() or {"chains": []}, self.place.chain)
        if replicas:
            self.experts = RemoteExperts(self.place.name, replicas, asyncio.get_running_loop())
            log.info("stage %s routes its MoE layers' rows to expert workers %s", self.place.name,
                     [r.worker_id for r in replicas])

    def _leave_while_loading(self, code: int) -> None:
        """With TP ranks, leave at once: the step thread may be inside the ranks' rendezvous,
        which nothing interrupts; nothing is served or registered yet, so nothing is lost."""
        if self.ranks is not None:
            self.ranks.kill()
            _exit_now(code)

    async def _watch(self) -> Unavailable:
        """Returns once the stage can never run a step again (a TP rank died); never for tp == 1."""
        while (failure := self._failure()) is None:
            await asyncio.sleep(WATCH_S)
        return failure

    def _failure(self) -> Unavailable | None:
        if self.pipeline.stage is not None:
            return self.pipeline.stage.failure()
        dead = self.ranks.first_dead() if self.ranks is not None else None
        return dead_rank_error(self.place.name, *dead) if dead else None

    async def _fail(self, err: Unavailable) -> None:
        """Unhealthy at once, every step answered with ``err``; exit 1 after a short grace.

        NOTE: the exit is ``os._exit``: the step thread may be blocked for good in a collective
        with the dead rank (NCCL never gives up), and a normal exit would join it.
        """
        log.error("%s: stage %s is unhealthy and exits in %.0f s", err.message, self.place.name, FAILED_EXIT_GRACE_S)
        self._stop_following()
        await self._set_health(NOT_SERVING)
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

    async def _shutdown(self, server: grpc.aio.Server) -> None:
        log.info("stage %s draining", self.place.name)
        self._stop_following()
        await self.health.enter_graceful_shutdown()
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        self.servicer.drain()
        await server.stop(self.args.grace_s)
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

    async def _set_serving(self, serving: bool) -> None:
        await self._set_health(SERVING if serving else NOT_SERVING)

    async def _set_health(self, status) -> None:
        for service in ("", STAGE_SERVICE):
            await self.health.set(service, status)

    def _worker_info(self) -> WorkerInfo:
        start, end = self.place.spec.bounds
        return WorkerInfo(
            worker_id=self.place.worker_id, role="stage", chain=self.place.chain, stage=self.place.stage,
            start_layer=start, end_layer=end, address=self.place.address,
            device=self.place.device, tp_size=self.place.tp,
        )

    def _figures(self) -> dict:
        """The pipeline's figures, plus each TP rank's pid and weight bytes."""
        figures = self.pipeline.figures.report(self.pipeline.runner)
        if self.pipeline.stage is not None:
            figures.update(self.pipeline.stage.figures())
        if self.experts is not None:
            figures.update(self.experts.figures())
        return figures
