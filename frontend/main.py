"""``python -m frontend``: one client-facing frontend of a mesh. It reads the model's tokenizer
and limits from the topology in Redis, serves ``stagemesh.v1.Gateway`` on the client port (and,
with ``--http-port``, the OpenAI-compatible HTTP API: ``frontend.http``) and hands every
request to the gateway over one stream (``frontend.link``). A mesh runs several
(``stagemesh up --frontends N``) on one port; each can be restarted on its own."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from frontend.auth import interceptors
from frontend.frontend import CLIENT_SERVER_OPTIONS, GATEWAY_SERVICE, Frontend, FrontendOptions
from frontend.stream import MESSAGES_PER_S
from stagemesh.runtime import api_keys, event_loop
from stagemesh.runtime.api_keys import ApiKeys
from stagemesh.runtime.server import WorkerServer, run
from stagemesh.runtime.startup import StartupError, add_redis_args, mesh_args, signer_from_args, start_worker
from stagemesh.runtime.tls import add_serving_cert_args, add_tls_args, serving_cert_from_args
from stagemesh.runtime.watchdog import add_liveness_arg

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m frontend", description="A client-facing frontend of a stagemesh mesh.")
    add_redis_args(p)
    add_tls_args(p)
    add_serving_cert_args(p)
    p.add_argument("--deployment", default="default", help="deployment name (Redis key namespace)")
    p.add_argument("--gateway", required=True, help="host:port of the gateway's Scheduling service")
    p.add_argument("--host", default="127.0.0.1", help="interface the client port binds")
    p.add_argument("--port", type=int, required=True,
                   help="the client port (stagemesh.v1.Gateway), shared by the frontends")
    p.add_argument("--name", default="frontend", help="how logs and the gateway name this frontend")
    p.add_argument("--own-port", type=int, default=None,
                   help="also serve on this port of its own (not shared): where probes reach this process's health")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API on this port, shared by the frontends (default: none)")
    p.add_argument("--gateway-http", default=None, metavar="HOST:PORT",
                   help="the gateway's HTTP side: its dashboard, /api/status, /metrics and /healthz are passed "
                        "through on --http-port")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the OpenAI API (default: the checkpoint directory's name)")
    p.add_argument("--stream-messages-per-s", type=float, default=MESSAGES_PER_S,
                   help="messages a second this frontend sends its clients in all; with many streams each message "
                        "then carries several tokens (0: one message per step per stream)")
    p.add_argument("--slot-files", nargs="+", type=Path, default=(), metavar="PATH",
                   help="serve only once this process holds the lock of one of these files, one per serving "
                        "frontend: with more frontends than files the others wait, loaded, as spares "
                        "(stagemesh up --spare-frontends); default: serve at once")
    p.add_argument("--topology-wait-s", type=float, default=10.0, help="how long to wait for Redis and the topology")
    p.add_argument("--grace-s", type=float, default=5.0, help="on SIGTERM, how long running streams may finish")
    add_liveness_arg(p)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    api_keys.add_arguments(p.add_argument_group("API keys (frontend.auth): asked for on the client and HTTP ports"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {args.name} %(name)s: %(message)s"
    )
    try:
        keys = ApiKeys.from_args(args)
        (redis_url, tls), cert = mesh_args(args, "frontend"), serving_cert_from_args(args)
    except (ValueError, StartupError) as err:
        log.error("%s cannot start: %s", args.name, err)
        return 1
    log.info("%s: API keys %s", args.name, f"required ({len(keys.keys)} accepted)" if keys.enabled else "off")
    opts = FrontendOptions(gateway=args.gateway, host=args.host, port=args.port, name=args.name,
                           messages_per_s=args.stream_messages_per_s, own_port=args.own_port,
                           http_port=args.http_port, gateway_http=args.gateway_http,
                           served_model_name=args.served_model_name, grace_s=args.grace_s, api_keys=keys,
                           tls=tls, serving_cert=cert, slots=tuple(args.slot_files))
    try:
        return event_loop.run(start_worker(
            redis_url, args.deployment, args.topology_wait_s, lambda topology: topology,
            lambda topology, store: run(
                WorkerServer(GATEWAY_SERVICE, args.grace_s, CLIENT_SERVER_OPTIONS, interceptors(keys), tls=tls,
                             liveness_s=args.liveness_s),
                Frontend(opts, topology)),
            signer=signer_from_args(args),
        ))
    except (StartupError, ValueError, OSError) as err:  # no topology, a broken checkpoint dir, a port in use
        log.error("%s cannot start: %s", args.name, err)
        return 1
