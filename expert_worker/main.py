"""Startup and shutdown of one expert worker process (``python -m expert_worker``).

Startup: Redis, the topology (waited for a few seconds), this worker's place in it, the gRPC
server (``Expert`` + ``grpc.health.v1``) with health NOT_SERVING, its experts' weights (loaded
off the event loop), health SERVING, then registration (role ``expert``, its experts per
layer) and heartbeats in Redis with its figures, per-expert token counts included.

Shutdown on SIGTERM / SIGINT: health NOT_SERVING, leave the registry (the gateway then marks
its replicas down and stages stop routing to it), answer every new batch UNAVAILABLE (so a
stage sends those rows to another replica), ``server.stop(grace)``, exit 0. Exit 1 when the
worker cannot start (the log line says why).

The lifecycle itself (signals, health of both names, drain, ``server.stop(grace)``) is
``stagemesh.runtime.server.run``, shared with the stage workers and the gateway; ``ExpertWorker``
is the expert worker's part in it.
"""

from __future__ import annotations

import argparse
import logging

from expert_worker.place import find_expert_worker
from expert_worker.worker import ExpertWorker
from stagemesh.runtime import cpus, event_loop, faults
from stagemesh.runtime.server import WorkerServer, run
from stagemesh.runtime.startup import StartupError, add_redis_args, mesh_args, signer_from_args, start_worker
from stagemesh.runtime.tls import MeshTLS, add_tls_args
from stagemesh.runtime.watchdog import add_liveness_arg
from stagemesh.v1 import expert_pb2

log = logging.getLogger(__name__)

EXPERT_SERVICE = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m expert_worker", description="Run one expert worker of a stagemesh chain."
    )
    add_redis_args(p)
    add_tls_args(p)
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
    add_liveness_arg(p)
    p.add_argument("--enable-fault-injection", action="store_true", default=faults.enabled_by_env(),
                   help=f"serve Admin.InjectFault (tests, drills; never in production); "
                        f"also on with {faults.FAULT_INJECTION_ENV}=1")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s expert-c{args.chain}-e{args.worker} %(name)s: %(message)s",
    )
    try:
        args.redis_url, tls = mesh_args(args, "expert")
        cpus.take(args.cpus, 0, args.threads)
        return event_loop.run(_run(args, tls))
    except StartupError as err:
        log.error("expert worker c%d-e%d cannot start: %s", args.chain, args.worker, err)
        return 1


async def _run(args: argparse.Namespace, tls: MeshTLS | None) -> int:
    return await start_worker(
        args.redis_url,
        args.deployment,
        args.topology_wait_s,
        lambda doc: find_expert_worker(doc, args.chain, args.worker),
        lambda place, store: run(WorkerServer(EXPERT_SERVICE, args.grace_s, tls=tls, liveness_s=args.liveness_s),
                                 ExpertWorker(args, place, store)),
        signer=signer_from_args(args),
    )
