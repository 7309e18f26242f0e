"""`stagemesh up` as a command: start the mesh (``stagemesh.deploy.launch.Mesh``), print its
ready line (where it listens, what guards it, where its logs are), supervise it until SIGTERM or
Ctrl-C, then stop everything."""

from __future__ import annotations

import signal
import sys

from stagemesh.deploy.launch import SUPERVISE_S, Mesh
from stagemesh.deploy.load_watch import LoadWatch
from stagemesh.deploy.up_plan import UpOptions
from stagemesh.mesh.store import redacted
from stagemesh.runtime.api_keys import ApiKeys


def _try(address: str, prompt: str, keys: ApiKeys) -> None:
    from stagemesh.client import Client
    from stagemesh.errors import StagemeshError

    try:
        with Client(address, timeout=120, api_key=keys.keys[0] if keys.enabled else None) as client:
            result = client.generate(prompt, max_new_tokens=24)
        print(f"try: {prompt!r} -> {result.text!r} (token ids {result.token_ids}, {result.finish_reason})", flush=True)
    except StagemeshError as e:
        print(f"try: {e.code}: {e.message}", flush=True)


def _keys_line(keys: ApiKeys) -> str:
    if not keys.enabled:
        return " | API keys off (any client may call)"
    return f" | API keys required ({len(keys.keys)})"


def _security_line(mesh: Mesh) -> str:
    """Redis (never its password) and what guards the mesh: where the run's secrets are, or INSECURE."""
    redis = f" | redis {redacted(mesh.redis_url)}"
    if mesh.secrets is None:
        return f"{redis} | INSECURE: no TLS between the mesh's processes, Redis without a password (--insecure)"
    run = mesh.secrets
    certs = "" if run.tls_dir.parent == run.directory.resolve() else f", certificates {run.tls_dir}"
    return f"{redis} | mTLS between the mesh's processes, Redis password: secrets {run.directory}{certs}"


def _micro_line(micro_batches: int | None, stages: int, asked: bool) -> str:
    """Says so when a chain keeps fewer micro-batches in flight than it has stages, and why."""
    if micro_batches is None or micro_batches >= stages:
        return ""
    why = "--micro-batches" if asked else "its stages share too few cores to compute at once"
    return f", {micro_batches} micro-batch(es) in flight a chain ({why})"


def _http_line(opts: UpOptions) -> str:
    if not opts.http_port:
        return " | dashboard off (--http-port serves it)"
    return f" | dashboard http://{opts.host}:{opts.http_port}/ (OpenAI API /v1, /metrics)"


def run_up(opts: UpOptions) -> int:
    """Start the mesh, print the ready line, serve until SIGTERM/Ctrl-C, then stop everything."""
    mesh = Mesh(opts)
    stop = {"requested": False}

    def _request_stop(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    clean = False
    print(f"stagemesh up: logs in {mesh.log_dir}", flush=True)
    try:
        topology = mesh.start()
        with LoadWatch(mesh.worker_logs()) as watch:
            mesh.wait_ready(on_wait=watch.poll)
        stages = len(topology.chains[0].stages)
        experts = f" + {opts.ep} expert worker(s) x {opts.expert_replicas} replica(s)" if opts.ep else ""
        micro = _micro_line(mesh.micro_batches, stages, asked=opts.micro_batches is not None)
        spares = f" + {opts.spare_frontends} spare" if opts.spare_frontends else ""
        print(
            f"stagemesh ready: gateway {mesh.gateway_address} ({mesh.frontends} frontend(s){spares}) | "
            f"{opts.dp} chain(s) of {stages} stage worker(s) "
            f"x tp {opts.tp}{experts} "
            f"on {opts.device}{micro}{_http_line(opts)}{_keys_line(opts.api_keys)}"
            f"{_security_line(mesh)} | logs {mesh.log_dir}",
            flush=True,
        )
        if opts.try_prompt:
            _try(mesh.gateway_address, opts.try_prompt, opts.api_keys)
        while not stop["requested"]:
            mesh.supervise()
            mesh.wait_for_exit(SUPERVISE_S)
        clean = True
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        keep = not clean and bool(mesh.procs)  # a failed mesh's logs say why (none when nothing started)
        mesh.stop(keep_logs=keep)
        if keep and mesh.temp_log_dir:
            print(f"the logs are kept in {mesh.log_dir}", file=sys.stderr, flush=True)
