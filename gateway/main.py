"""``python -m gateway --redis-url URL --port P``: the command line of a mesh's gateway (its part in the
server lifecycle is ``gateway.gateway.Gateway``); runs until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.gateway import GatewayOptions, serve
from gateway.hub import RESUME_WINDOW_S
from gateway.lead import FENCE_AFTER_S
from gateway.router import FAILOVER_WAIT_S
from stagemesh.runtime import event_loop
from stagemesh.runtime.startup import StartupError, add_redis_args, mesh_args, signer_from_args
from stagemesh.runtime.tls import add_tls_args
from stagemesh.runtime.watchdog import add_liveness_arg

logger = logging.getLogger("gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="The client-facing gateway of a stagemesh mesh.")
    add_redis_args(p)
    add_tls_args(p)
    p.add_argument("--deployment", default="default", help="the mesh's name in Redis (same as its workers')")
    p.add_argument("--host", default="127.0.0.1", help="interface the gRPC (and HTTP) server binds")
    p.add_argument("--port", type=int, required=True, help="gRPC port of the Scheduling service (the frontends connect)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the dashboard (/), /api/status, /metrics and /healthz over HTTP here")
    p.add_argument("--http-host", default=None,
                   help="interface the HTTP server binds (default: --host); its pages ask for no API key, "
                        "so keep it private (the frontends pass them through with the key check)")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="token budget of one micro-batch")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one micro-batch at most")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="requests one chain queues at most; past that RESOURCE_EXHAUSTED with a retry hint")
    p.add_argument("--grace-s", type=float, default=5.0, help="on SIGTERM, how long running calls may finish")
    add_liveness_arg(p)
    p.add_argument("--failover-wait-s", type=float, default=FAILOVER_WAIT_S,
                   help="how long a running request whose chain failed waits for a healthy chain before UNAVAILABLE")
    p.add_argument("--resume-window-s", type=float, default=RESUME_WINDOW_S,
                   help="how long a request whose frontend left runs on for a client to resume it, then is cancelled")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="wait for each step's tokens before sending a step after it (overlap scheduling is on by default)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches each chain keeps in flight (default: one per stage; fewer when its stages "
                        "share too few cores to compute at once)")
    p.add_argument("--lock-file", type=Path, default=None,
                   help="schedule only while holding an exclusive lock on this file: a second gateway given the "
                        "same file is a warm standby that takes over the moment the first exits (one host)")
    p.add_argument("--fence-after-s", type=float, default=FENCE_AFTER_S,
                   help="with --lock-file: the standby kills a leader that answered no health check this long")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fence_after_s <= 0:
        parser.error(f"--fence-after-s {args.fence_after_s}: a leader must be silent for more than 0 s to be killed")
    if args.micro_batches is not None and args.micro_batches < 1:
        parser.error(f"--micro-batches {args.micro_batches}: a chain needs at least 1 micro-batch in flight")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        redis_url, tls = mesh_args(args, "gateway")
        signer = signer_from_args(args)
    except StartupError as err:
        logger.error("gateway failed: %s", err)
        return 1
    opts = GatewayOptions(
        redis_url=redis_url,
        deployment=args.deployment,
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        http_host=args.http_host,
        max_num_batched_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,
        shutdown_grace_s=args.grace_s,
        failover_wait_s=args.failover_wait_s,
        overlap=args.overlap,
        micro_batches=args.micro_batches,
        resume_window_s=args.resume_window_s,
        tls=tls,
        signer=signer,
        lock_file=args.lock_file,
        fence_after_s=args.fence_after_s,
        liveness_s=args.liveness_s,
    )
    try:
        event_loop.run(serve(opts))
    except (ValueError, KeyError, OSError, RuntimeError, StartupError) as err:  # a broken topology or checkpoint, a port in use
        logger.error("gateway failed: %s: %s", type(err).__name__, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
