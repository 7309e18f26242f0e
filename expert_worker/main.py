"""Startup and shutdown of one expert worker process (``python -m expert_worker``).

Startup: Redis, the topology (waited for a few seconds), this worker's place in it, the gRPC
server (``Expert`` + ``grpc.health.v1``) with health NOT_SERVING, its experts' weights (loaded
off the event loop), health SERVING, then registration (role ``expert``, its experts per
layer) and heartbeats in Redis with its figures, per-expert token counts included.

Shutdown on SIGTERM / SIGINT: health NOT_SERVING, leave the registry (the gateway then marks
its replicas down and stages stop routing to it), answer every new batch UNAVAILABLE (so a
stage sends those rows to another replica), ``server.stop(grace)``, exit 0. Exit 1 when the
worker cannot start (the log line says why).

NOTE: it shares the stage worker's heartbeat and address helpers (``stagemesh.runtime.heartbeat``,
``stage_worker.topology``): both are worker processes of the same mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expert_worker.place import ExpertPlace, find_expert_worker
from expert_worker.servicer import ExpertServicer
from stage_worker.main import SERVER_OPTIONS
from stage_worker.topology import default_host, port_of
from stagemesh.mesh.store import Store, WorkerInfo
from stagemesh.runtime import cpus
from stagemesh.runtime.heartbeat import Heartbeat
from stagemesh.runtime.startup import StartupError, start_worker
from stagemesh.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)

EXPERT_SERVICE = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m expert_worker", description="Run one expert worker of a stagemesh chain."
    )
    p.add_argument("--redis-url", required=True, help="Redis holding the topology, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--chain", type=int, required=True, help="data-parallel chain whose stages route to this worker")
    p.add_argument("--worker", type=int, required=True, help="index of this expert worker within the chain")
    p.add_argument("--deployment", default="default", help="deployment name (Redis key namespace)")
    p.add_argument("--host", help="interface to bind (default: the topology address's host if loopback, else [::])")
    p.add_argument("--threads", type=int, help="torch intra-op threads (torch.set_num_threads)")
    p.add_argument("--cpus", type=cpus.arg, help="cores to bind to, e.g. 2,3 (default: unbound)")
    p.add_argument("--topology-wait-s", type=float, default=10.0, help="how long to wait for Redis and the topology")
    p.add_argument("--drain-s", type=float, default=1.0,
                   help="on SIGTERM, how long it keeps answering (UNAVAILABLE) while stages learn it is gone")
    p.add_argument("--grace-s", type=float, default=5.0, help="on SIGTERM, how long in-flight streams may finish")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s expert-c{args.chain}-e{args.worker} %(name)s: %(message)s",
    )
    try:
        cpus.take(args.cpus, 0, args.threads)
        return asyncio.run(_run(args))
    except StartupError as err:
        log.error("expert worker c%d-e%d cannot start: %s", args.chain, args.worker, err)
        return 1


async def _run(args: argparse.Namespace) -> int:
    return await start_worker(
        args.redis_url,
        args.deployment,
        args.topology_wait_s,
        lambda doc: find_expert_worker(doc, args.chain, args.worker),
        lambda place, store: ExpertWorker(args, place, store).serve(),
    )


class ExpertWorker:
    """One expert worker's lifetime: serve until SIGTERM / SIGINT, then drain."""

    def __init__(self, args: argparse.Namespace, place: ExpertPlace, store: Store):
        self.args, self.place, self.store = args, place, store
        self.servicer = ExpertServicer(place)
        self.health = health.aio.HealthServicer()
        self.heartbeat: Heartbeat | None = None

    async def serve(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await self._start_server()
        try:
            if not await self._load(stop):
                return 0
            await self._set_health(SERVING)
            self.heartbeat = Heartbeat(self.store, self._worker_info(), self._figures)
            self.heartbeat.start()
            log.info("expert worker %s serving experts %s on %s at %s", self.place.name, self.place.experts,
                     self.place.device, self.place.address)
            await stop.wait()
            return 0
        finally:
            await self._shutdown(server)

    async def _start_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        expert_pb2_grpc.add_ExpertServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(NOT_SERVING)
        bind = f"{self.args.host or default_host(self.place.address)}:{port_of(self.place.address)}"
        try:
            if server.add_insecure_port(bind) == 0:
                raise RuntimeError("port unavailable")
        except RuntimeError as err:
            raise StartupError(f"cannot listen on {bind} ({err}); is another process using the port?") from err
        await server.start()
        log.info("listening on %s; loading experts %s", bind, self.place.experts)
        return server

    async def _load(self, stop: asyncio.Event) -> bool:
        """Load this worker's experts; False when a stop signal came first."""
        place = self.place
        loading = asyncio.ensure_future(self.servicer.load())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            log.info("stop requested while loading weights")
            return False
        try:
            loading.result()
        except Exception as err:  # noqa: BLE001 - reported as a startup failure
            raise StartupError(f"loading experts {place.experts} of {place.model} failed: {err}") from err
        return True

    async def _shutdown(self, server: grpc.aio.Server) -> None:
        log.info("expert worker %s draining", self.place.name)
        await self.health.enter_graceful_shutdown()
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        self.servicer.draining = True
        await asyncio.sleep(self.args.drain_s if self.heartbeat is not None else 0)
        await server.stop(self.args.grace_s)
        await asyncio.to_thread(self.servicer.close)
        log.info("expert worker %s stopped", self.place.name)

    async def _set_health(self, status) -> None:
        for service in ("", EXPERT_SERVICE):
            await self.health.set(service, status)

    def _worker_info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.place.worker_id, role="expert", chain=self.place.chain, experts=self.place.experts,
            start_layer=min(self.place.experts, default=0), end_layer=max(self.place.experts, default=-1) + 1,
            address=self.place.address, device=self.place.device,
        )

    def _figures(self) -> dict:
        runner = self.servicer.runner
        figures = runner.figures.report() if runner is not None else {}
        return {**figures, "queue_depth": self.servicer.waiting, "weight_bytes": runner.weight_bytes if runner else 0}
