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

The lifecycle itself (signals, health of both names, drain, ``server.stop(grace)``) is
``stagemesh.runtime.server.run``; ``StageWorker`` is the stage's part in it.
"""

from __future__ import annotations

import argparse
import logging

from stage_worker.topology import StagePlace, find_stage
from stage_worker.tp import check_devices
from stage_worker.worker import StageWorker
from stagemesh.config import ModelConfig
from stagemesh.mesh.layout import validate_layout
from stagemesh.mesh.store import Store
from stagemesh.runtime import cpus, event_loop, faults
from stagemesh.runtime.server import WorkerServer, run
from stagemesh.runtime.startup import StartupError, add_redis_args, mesh_args, signer_from_args, start_worker
from stagemesh.runtime.tls import MeshTLS, add_tls_args
from stagemesh.runtime.watchdog import add_liveness_arg
from stagemesh.v1 import stage_pb2

log = logging.getLogger(__name__)

STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stage_worker", description="Run one pipeline stage of a stagemesh chain."
    )
    add_redis_args(p)
    add_tls_args(p)
    p.add_argument("--chain", type=int, required=True, help="data-parallel chain of this stage")
    p.add_argument("--stage", type=int, required=True, help="pipeline stage index within the chain")
    p.add_argument("--deployment", default="default", help="deployment name (Redis key namespace)")
    p.add_argument("--host", help="interface to bind (default: the topology address's host if loopback, else [::])")
    p.add_argument("--threads", type=int, help="torch intra-op threads of each rank (torch.set_num_threads)")
    p.add_argument("--cpus", type=cpus.arg,
                   help="cores of this stage, e.g. 0-3: TP rank r binds to the r-th --threads of them")
    p.add_argument("--kv-blocks", type=int, help="KV-cache blocks (overrides the topology's kv_blocks)")
    p.add_argument("--kv-memory-mb", type=int, help="KV-cache budget in MiB when no block count is given")
    p.add_argument("--tp-backend", choices=["nccl", "gloo"],
                   help="TP ranks' torch.distributed backend (default: the topology's, else nccl on cuda, gloo on cpu)")
    p.add_argument("--topology-wait-s", type=float, default=10.0, help="how long to wait for Redis and the topology")
    p.add_argument("--grace-s", type=float, default=5.0, help="on SIGTERM, how long in-flight streams may finish")
    add_liveness_arg(p, also="; with --tp > 1 also kill a TP rank stopped (SIGSTOP) that long, which takes the "
                             "stage down to be restarted")
    p.add_argument("--enable-fault-injection", action="store_true", default=faults.enabled_by_env(),
                   help=f"serve Admin.InjectFault (tests, drills; never in production); "
                        f"also on with {faults.FAULT_INJECTION_ENV}=1")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s stage-c{args.chain}-s{args.stage} %(name)s: %(message)s",
    )
    try:
        args.redis_url, tls = mesh_args(args, "stage")
        cpus.take(args.cpus, 0, args.threads)
        return event_loop.run(_run(args, tls))
    except StartupError as err:
        log.error("stage c%d-s%d cannot start: %s", args.chain, args.stage, err)
        return 1


async def _run(args: argparse.Namespace, tls: MeshTLS | None) -> int:
    async def serve(place: StagePlace, store: Store) -> int:
        _check_layout(place)
        server = WorkerServer(STAGE_SERVICE, args.grace_s, tls=tls, liveness_s=args.liveness_s)
        return await run(server, StageWorker(args, place, store, tls))

    def find(doc):
        return find_stage(doc, args.chain, args.stage)

    return await start_worker(args.redis_url, args.deployment, args.topology_wait_s, find, serve,
                              signer=signer_from_args(args))


def _check_layout(place: StagePlace) -> None:
    """The layout checks of `stagemesh up`, made again here against this host's devices."""
    try:
        validate_layout(ModelConfig.from_dir(place.model), place.num_stages, place.tp)
        check_devices(place.devices)
    except ValueError as err:
        raise StartupError(f"stage {place.name} cannot run as the topology places it: {err}") from err
