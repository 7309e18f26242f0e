"""`stagemesh up`: its command-line flags and the ``UpOptions`` they make (the launcher is
``stagemesh.deploy.up``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stagemesh.deploy.hub import add_model_arguments, resolve_model
from stagemesh.runtime import api_keys
from stagemesh.runtime.api_keys import ApiKeys
from stagemesh.runtime.procs import LIVENESS_S


def add_up_args(p: argparse.ArgumentParser) -> None:
    """`stagemesh up`'s flags."""
    add_model_arguments(p, "the model every worker loads")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (one worker process each)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage (one process and one device each)")
    p.add_argument("--tp-backend", choices=["nccl", "gloo"], default=None,
                   help="torch.distributed backend of the TP ranks (default: nccl on cuda, gloo on cpu)")
    p.add_argument("--ep", type=int, default=0,
                   help="expert worker processes (one device each) holding the MoE experts; 0 keeps them in the stages")
    p.add_argument("--expert-replicas", type=int, default=1, help="expert workers holding each expert (at most --ep)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel chains: complete replicas of the stages (and expert workers) behind the gateway")
    p.add_argument("--no-restart", dest="restart", action="store_false",
                   help="stop the mesh when a worker, the gateway or a frontend exits instead of restarting it "
                        "(a local Redis is restarted either way)")
    p.add_argument("--liveness-s", type=float, default=LIVENESS_S, metavar="S",
                   help="kill and restart a worker, the gateway, a frontend or the local Redis that served and then "
                        "answered no health check for S seconds (frozen); 0: never (default %(default)g)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="wait for each step's tokens before scheduling a step after it (overlap scheduling is on by default)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences in one micro-batch at most (default 256)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches each chain keeps in flight (default: one per stage; on CPU only as many "
                        "as its stages can compute at once on the cores they share)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests one chain queues at most; past that RESOURCE_EXHAUSTED with a retry hint (default 1024)")
    p.add_argument("--failover-wait-s", type=float, default=None,
                   help="how long a running request whose chain failed waits for one to come back (default 30)")
    p.add_argument("--resume-window-s", type=float, default=None,
                   help="how long a request whose frontend died runs on for its client to resume it (default 30)")
    p.add_argument("--fault-injection", action="store_true",
                   help="let the workers' Admin.InjectFault fail, stall or drop their steps (chaos testing only)")
    p.add_argument("--no-cpu-bind", dest="cpu_bind", action="store_false",
                   help="leave the worker processes unbound (by default each gets cores of its own when there are enough)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the workers compute (cuda: one GPU per TP rank and per expert worker)")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway and workers listen on")
    p.add_argument("--port", type=int, default=50051, help="client gRPC port, shared by the frontends")
    p.add_argument("--frontends", type=int, default=None,
                   help="frontend processes serving clients on --port (default: one per 8 cores, 1 to 4)")
    p.add_argument("--spare-frontends", type=int, default=0, metavar="N",
                   help="N more frontend processes, loaded and linked to the gateway, that serve the client port "
                        "only when a serving frontend exits: a lone frontend's death then costs its clients a "
                        "reconnect, not a restart (default: 0)")
    p.add_argument("--standby-gateway", action="store_true",
                   help="start a second gateway that waits, warm, and takes over the moment the first exits "
                        "(its streams wait ~0.25 s instead of a restart's ~0.5 s on a small CPU host)")
    p.add_argument("--standby-fence-s", type=float, default=None, metavar="S",
                   help="with --standby-gateway: the standby kills a gateway that answered no health check for S "
                        "seconds (frozen) and takes over (default 10)")
    p.add_argument("--http-port", type=int, default=None,
                   help="HTTP port of the frontends: the OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health) beside the gateway's dashboard (/), /api/status and /metrics")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the OpenAI API (default: the checkpoint directory's name)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting a local redis-server")
    p.add_argument("--deployment", default="default", help="name that keeps this mesh's Redis keys apart")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the weights and KV cache (default: the checkpoint's)")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV-cache blocks per stage (default: from a memory budget)")
    p.add_argument("--log-dir", type=Path, default=None, help="where worker logs go (default: a new temp dir)")
    p.add_argument("--try", dest="try_prompt", default=None, metavar="PROMPT", help="once ready, generate from PROMPT and print it")
    api_keys.add_arguments(p.add_argument_group("API keys: asked for on the client port and the HTTP port"))
    sec = p.add_argument_group("mesh security: mTLS between the mesh's processes and a Redis password, on by default")
    sec.add_argument("--insecure", action="store_true",
                     help="no TLS between the mesh's processes and no Redis password (the ready line says INSECURE)")
    sec.add_argument("--tls-dir", type=Path, default=None,
                     help="the mesh's certificates from `stagemesh certs DIR` (default: made for the run)")
    from stagemesh.runtime.tls import add_serving_cert_args

    add_serving_cert_args(sec)


def run(args: argparse.Namespace) -> int:
    """`stagemesh up`: plan the layout from its flags, start the mesh, serve until Ctrl-C / SIGTERM."""
    from stagemesh.deploy.up import run_up
    from stagemesh.deploy.up_plan import UpOptions

    source = resolve_model(args.model, args.revision)  # once, here: the workers get the directory
    opts = UpOptions(
        model=source.path,
        pp=args.pp,
        tp=args.tp,
        dp=args.dp,
        tp_backend=args.tp_backend,
        ep=args.ep,
        expert_replicas=args.expert_replicas,
        device=args.device,
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        served_model_name=args.served_model_name or source.repo_id,
        frontends=args.frontends,
        spare_frontends=args.spare_frontends,
        standby_gateway=args.standby_gateway,
        standby_fence_s=args.standby_fence_s,
        redis_url=args.redis_url,
        deployment=args.deployment,
        dtype=args.dtype,
        kv_blocks=args.kv_blocks,
        log_dir=args.log_dir,
        try_prompt=args.try_prompt,
        restart=args.restart,
        liveness_s=args.liveness_s,
        overlap=args.overlap,
        max_num_seqs=args.max_num_seqs,
        micro_batches=args.micro_batches,
        max_waiting=args.max_waiting,
        failover_wait_s=args.failover_wait_s,
        resume_window_s=args.resume_window_s,
        fault_injection=args.fault_injection,
        cpu_bind=args.cpu_bind,
        api_keys=ApiKeys.from_args(args),
        **_security_options(args),
    )
    return run_up(opts)


def _security_options(args: argparse.Namespace) -> dict:
    """``UpOptions``' ``insecure``, ``tls_dir`` and ``serving_cert`` from `up`'s flags."""
    from stagemesh.runtime.tls import serving_cert_from_args

    if args.insecure and args.tls_dir is not None:
        raise ValueError("--insecure and --tls-dir contradict each other: give one")
    return {"insecure": args.insecure, "tls_dir": args.tls_dir, "serving_cert": serving_cert_from_args(args)}
