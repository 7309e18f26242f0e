"""`stagemesh up`: plan a layout, start Redis, the stage workers and the gateway, stop them all.

NOTE: every worker is a separate local process (`python -m stage_worker`, `python -m gateway`)
exactly as compose would run them, so `up` exercises the real mesh. The launcher writes the
planned topology to Redis; workers and the gateway read it from there. Children get
PR_SET_PDEATHSIG so they die with the launcher even when it is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .plan import expert_devices, place_experts, split_layers, stage_devices, validate_layout
from .procs import die_with_parent
from .redis_server import free_port, start_local_redis
from .store import Store, expert_worker_id, stage_worker_id

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class UpOptions:
    """What `stagemesh up` was asked for."""

    model: Path
    pp: int = 1
    tp: int = 1
    """Tensor-parallel ranks per stage, one process and one device each."""
    tp_backend: str | None = None
    """torch.distributed backend of the TP ranks; None: nccl on CUDA, gloo on CPU."""
    ep: int = 0
    """Expert worker processes per chain, one device each; 0 keeps the experts in the stages."""
    expert_replicas: int = 1
    """Expert workers that hold each expert (of each MoE layer); at most ``ep``."""
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None
    redis_url: str | None = None
    deployment: str = "default"
    dtype: str | None = None
    kv_blocks: int | None = None
    log_dir: Path | None = None
    try_prompt: str | None = None
    """Once ready, send this prompt through the gateway and print the reply."""


def plan_topology(opts: UpOptions) -> dict:
    """The topology document: one chain of stages with their layers, addresses and devices,
    and (with ``ep``) its expert workers with the experts each holds.

    ValueError (before anything starts) when the model or the machine cannot take the layout.
    """
    config = ModelConfig.from_dir(opts.model)
    gpus = _visible_gpus() if opts.device == "cuda" else None
    validate_layout(config, opts.pp, opts.tp, ep=opts.ep, gpus=gpus)
    specs = split_layers(config, opts.pp)
    devices = stage_devices(opts.device, opts.pp, opts.tp)
    stages = [
        {
            "stage": i,
            "start_layer": spec.start_layer,
            "end_layer": spec.end_layer,
            "address": f"{opts.host}:{free_port()}",
            "device": devices[i][0],
            "tp": opts.tp,
            "devices": devices[i],
            "tp_backend": opts.tp_backend,
            "kv_blocks": opts.kv_blocks,
        }
        for i, spec in enumerate(specs)
    ]
    return {
        "model": str(opts.model.resolve()),
        "num_layers": config.num_hidden_layers,
        "block_size": 16,
        "dtype": opts.dtype,
        "chains": [{"chain": 0, "stages": stages, "experts": _plan_experts(config, opts)}],
    }


def _plan_experts(config: ModelConfig, opts: UpOptions) -> list[dict]:
    """One chain's expert worker entries (none without ``ep``)."""
    if not opts.ep:
        if opts.expert_replicas != 1:
            raise ValueError(f"expert replicas={opts.expert_replicas} needs expert workers: give --ep too")
        return []
    held = place_experts(config, opts.ep, opts.expert_replicas)
    devices = expert_devices(opts.device, opts.pp * opts.tp, opts.ep)
    return [
        {"worker": w, "address": f"{opts.host}:{free_port()}", "device": devices[w],
         "experts": {str(layer): ids for layer, ids in experts.items()}}
        for w, experts in enumerate(held)
    ]


def _visible_gpus() -> int:
    import torch  # only the GPU path needs it

    return torch.cuda.device_count()


class Mesh:
    """The processes of one `stagemesh up`."""

    def __init__(self, opts: UpOptions):
        self.opts = opts
        self.redis = None
        self.redis_url = opts.redis_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.spare: set[str] = set()
        """Children whose exit the mesh outlives: expert workers whose experts all have other replicas."""
        self._gone: set[str] = set()
        self.log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="stagemesh-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def gateway_address(self) -> str:
        return f"{self.opts.host}:{self.opts.port}"

    def start(self) -> dict:
        topology = plan_topology(self.opts)
        if self.redis_url is None:
            self.redis = start_local_redis(data_dir=self.log_dir / "redis")
            self.redis_url = self.redis.url
        asyncio.run(_write_topology(self.redis_url, self.opts.deployment, topology))
        stages, experts = topology["chains"][0]["stages"], topology["chains"][0]["experts"]
        threads = max(1, _cores() // (len(stages) * self.opts.tp + len(experts)))  # per rank / expert worker
        for s in stages:
            self._spawn(stage_worker_id(0, s["stage"]), "stage_worker", "--chain", "0", "--stage", str(s["stage"]), "--threads", str(threads))
        for e in experts:
            name = expert_worker_id(0, e["worker"])
            self._spawn(name, "expert_worker", "--chain", "0", "--worker", str(e["worker"]), "--threads", str(threads))
            if self.opts.expert_replicas > 1:
                self.spare.add(name)
        gateway_args = ["--host", self.opts.host, "--port", str(self.opts.port)]
        if self.opts.http_port:
            gateway_args += ["--http-port", str(self.opts.http_port)]
        self._spawn("gateway", "gateway", *gateway_args)
        return topology

    def _spawn(self, name: str, module: str, *args: str) -> None:
        common = ["--redis-url", self.redis_url, "--deployment", self.opts.deployment]
        logfile = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", module, *common, *args],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        logfile.close()
        log.info("started %s (pid %d), log %s", name, self.procs[name].pid, self.log_dir / f"{name}.log")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the gateway's health answers SERVING; a child that exits first is an error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            if _health_serving(self.gateway_address):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the mesh was not ready after {timeout:.0f}s; logs in {self.log_dir}")

    def check_children(self) -> None:
        """RuntimeError when a child exited, except a spare one (its experts' other replicas serve)."""
        for name, proc in self.procs.items():
            if proc.poll() is None or name in self._gone:
                continue
            if name in self.spare:
                log.warning("%s exited with code %d; the other replicas of its experts serve", name, proc.returncode)
                self._gone.add(name)
                continue
            tail = _tail(self.log_dir / f"{name}.log")
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the gateway, then the workers; SIGKILL what is left after ``grace``; stop Redis."""
        order = ["gateway"] + [n for n in self.procs if n != "gateway"]
        for name in order:
            if name in self.procs and self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()


async def _write_topology(url: str, deployment: str, topology: dict) -> None:
    store = await Store.connect(url, deployment)
    try:
        await store.set_topology(topology)
    finally:
        await store.close()


def _health_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _try(address: str, prompt: str) -> None:
    from .client import Client
    from .errors import StagemeshError

    try:
        with Client(address, timeout=120) as client:
            result = client.generate(prompt, max_new_tokens=24)
        print(f"try: {prompt!r} -> {result.text!r} (token ids {result.token_ids}, {result.finish_reason})", flush=True)
    except StagemeshError as e:
        print(f"try: {e.code}: {e.message}", flush=True)


def run_up(opts: UpOptions) -> int:
    """Start the mesh, print the ready line, serve until SIGTERM/Ctrl-C, then stop everything."""
    mesh = Mesh(opts)
    stop = {"requested": False}

    def _request_stop(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        topology = mesh.start()
        mesh.wait_ready()
        stages = len(topology["chains"][0]["stages"])
        experts = f" + {opts.ep} expert worker(s) x {opts.expert_replicas} replica(s)" if opts.ep else ""
        print(
            f"stagemesh ready: gateway {mesh.gateway_address} | {stages} stage worker(s) x tp {opts.tp}{experts} "
            f"on {opts.device} | redis {mesh.redis_url} | logs {mesh.log_dir}",
            flush=True,
        )
        if opts.try_prompt:
            _try(mesh.gateway_address, opts.try_prompt)
        while not stop["requested"]:
            mesh.check_children()
            time.sleep(0.5)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        mesh.stop()
