"""`stagemesh up`: plan a layout, start Redis, the stage workers, the gateway and the frontends,
stop them all.

NOTE: every worker is a separate local process (`python -m stage_worker`, `python -m gateway`,
`python -m frontend`)
exactly as compose would run them, so `up` exercises the real mesh. The launcher writes the
planned topology to Redis; workers and the gateway read it from there. Children get
PR_SET_PDEATHSIG so they die with the launcher even when it is SIGKILLed.

Supervision: once the mesh is ready, a stage or expert worker that exits is started again
with the same arguments (so on the same port), after a backoff (``stagemesh.deploy.supervise``); it
registers again and the gateway puts its chain back in service. A frontend that exits is
started again the same way (its clients retry on the others meanwhile). The gateway is not restarted:
its exit stops the whole mesh. ``restart=False`` (``--no-restart``) stops the mesh when a
worker exits instead, except an expert worker whose experts all have other replicas.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagemesh.config import ModelConfig, StageSpec
from stagemesh.deploy.redis_server import start_local_redis
from stagemesh.deploy.supervise import Lifeline, RestartPolicy
from stagemesh.mesh.layout import (
    chain_devices,
    expert_devices,
    place_experts,
    split_layers,
    stage_devices,
    validate_layout,
)
from stagemesh.mesh.store import Store, expert_worker_id, stage_worker_id
from stagemesh.mesh.topology import Chain, ExpertWorker, Stage, Topology
from stagemesh.runtime import cpus
from stagemesh.runtime.health import serving_sync
from stagemesh.runtime.net import free_port, port_in_use
from stagemesh.runtime.procs import die_with_parent

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class UpOptions:
    """What `stagemesh up` was asked for."""

    model: Path
    pp: int = 1
    tp: int = 1
    """Tensor-parallel ranks per stage, one process and one device each."""
    dp: int = 1
    """Data-parallel chains: complete replicas (stages and expert workers), one after the other on the GPUs."""
    tp_backend: str | None = None
    """torch.distributed backend of the TP ranks; None: nccl on CUDA, gloo on CPU."""
    ep: int = 0
    """Expert worker processes per chain, one device each; 0 keeps the experts in the stages."""
    expert_replicas: int = 1
    """Expert workers that hold each expert (of each MoE layer); at most ``ep``."""
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 50051
    """The client port, served by every frontend (``stagemesh.v1.Gateway``)."""
    http_port: int | None = None
    """The gateway's HTTP port (dashboard, ``/api/status``, ``/metrics``); None: none."""
    frontends: int | None = None
    """Frontend processes sharing the client port; None: ``default_frontends()`` for this host."""
    redis_url: str | None = None
    deployment: str = "default"
    dtype: str | None = None
    kv_blocks: int | None = None
    log_dir: Path | None = None
    try_prompt: str | None = None
    """Once ready, send this prompt through the gateway and print the reply."""
    restart: bool = True
    """Restart a stage or expert worker that exits (False: its exit stops the mesh)."""
    overlap: bool = True
    """Overlap scheduling (the gateway's ``--no-overlap`` when False)."""
    cpu_bind: bool = True
    """Give each compute process cores of its own (``stagemesh.runtime.cpus``) when there are enough."""
    restart_policy: RestartPolicy = RestartPolicy()
    gpus: int | None = None
    """GPUs the layout may book on CUDA; None counts this machine's visible ones (`stagemesh compose`
    plans for other machines)."""
    advertise: Callable[[str, list[str]], str] | None = None
    """(worker id, its devices) -> the ``host:port`` it listens on and peers reach it at; None:
    ``host`` and a free local port (`stagemesh compose` gives service or host names)."""


def plan_topology(opts: UpOptions) -> Topology:
    """The topology: ``dp`` chains, each with its stages (layers, addresses, devices) and (with
    ``ep``) its expert workers with the experts each holds.

    Every chain is a complete replica on its own ports; on CUDA chain ``c`` takes the
    ``pp × tp + ep`` GPUs after chain ``c - 1``'s, so no GPU is booked twice. ValueError
    (before anything starts) when the model or the machine cannot take the layout.
    """
    config = ModelConfig.from_dir(opts.model)
    gpus = (_visible_gpus() if opts.gpus is None else opts.gpus) if opts.device == "cuda" else None
    validate_layout(config, opts.pp, opts.tp, ep=opts.ep, dp=opts.dp, gpus=gpus)
    specs = split_layers(config, opts.pp)
    per_chain = chain_devices(opts.pp, opts.tp, opts.ep)
    return Topology(
        model=str(opts.model.resolve()),
        num_layers=config.num_hidden_layers,
        chains=tuple(_plan_chain(c, config, specs, opts, first_gpu=c * per_chain) for c in range(opts.dp)),
        block_size=16,
        dtype=opts.dtype,
    )


def _plan_chain(chain: int, config: ModelConfig, specs: list[StageSpec], opts: UpOptions, first_gpu: int) -> Chain:
    """One chain: its stages, then its expert workers on the GPUs after its stages'."""
    devices = stage_devices(opts.device, opts.pp, opts.tp, first_gpu)
    stages = tuple(
        Stage(
            index=i,
            start_layer=spec.start_layer,
            end_layer=spec.end_layer,
            address=_address(opts, stage_worker_id(chain, i), devices[i]),
            devices=tuple(devices[i]),
            mlp_only_start=spec.mlp_only_start,
            attn_only_end=spec.attn_only_end,
            tp_backend=opts.tp_backend,
            kv_blocks=opts.kv_blocks,
        )
        for i, spec in enumerate(specs)
    )
    return Chain(chain, stages, _plan_experts(config, opts, chain, first_gpu + opts.pp * opts.tp))


def _plan_experts(config: ModelConfig, opts: UpOptions, chain: int, first_gpu: int) -> tuple[ExpertWorker, ...]:
    """One chain's expert workers (none without ``ep``), on CUDA from GPU ``first_gpu`` on."""
    if not opts.ep:
        if opts.expert_replicas != 1:
            raise ValueError(f"expert replicas={opts.expert_replicas} needs expert workers: give --ep too")
        return ()
    held = place_experts(config, opts.ep, opts.expert_replicas)
    devices = expert_devices(opts.device, first_gpu, opts.ep)
    return tuple(
        ExpertWorker(w, _address(opts, expert_worker_id(chain, w), [devices[w]]), devices[w],
                     {layer: tuple(sorted(ids)) for layer, ids in sorted(experts.items())})
        for w, experts in enumerate(held)
    )


def _address(opts: UpOptions, worker_id: str, devices: list[str]) -> str:
    """Where worker ``worker_id`` listens and is reached: ``opts.advertise``'s answer, else ``host`` and a free port."""
    if opts.advertise is not None:
        return opts.advertise(worker_id, devices)
    return f"{opts.host}:{free_port()}"


def _visible_gpus() -> int:
    import torch  # only the GPU path needs it

    return torch.cuda.device_count()


def default_frontends() -> int:
    """One frontend per 8 cores this process may use, at least 1 and at most 4: a frontend
    streams thousands of tokens per second per core, and the cores are the model's first."""
    return max(1, min(4, len(cpus.available()) // 8))


class Mesh:
    """The processes of one `stagemesh up`."""

    def __init__(self, opts: UpOptions):
        self.opts = opts
        self.redis = None
        self.redis_url = opts.redis_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        """Each child's command line, to start it again the same way (same port)."""
        self.lifelines: dict[str, Lifeline] = {}
        self.spare: set[str] = set()
        """Children whose exit the mesh outlives: expert workers whose experts all have other replicas."""
        self._gone: set[str] = set()
        """Children that exited for good (spare ones, and workers given up on)."""
        self.log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="stagemesh-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.frontends = opts.frontends if opts.frontends is not None else default_frontends()
        if self.frontends < 1:
            raise ValueError(f"frontends={self.frontends}: a mesh needs at least one frontend to serve clients")

    @property
    def gateway_address(self) -> str:
        """Where clients reach the mesh: the frontends' shared port."""
        return f"{self.opts.host}:{self.opts.port}"

    def start(self) -> Topology:
        for port in (self.opts.port, self.opts.http_port):
            if port and port_in_use(self.opts.host, port):
                raise RuntimeError(
                    f"port {port} on {self.opts.host} is already in use (another stagemesh up?); "
                    "stop that process or choose another --port / --http-port"
                )
        topology = plan_topology(self.opts)
        if self.redis_url is None:
            self.redis = start_local_redis(data_dir=self.log_dir / "redis")
            self.redis_url = self.redis.url
        asyncio.run(_write_topology(self.redis_url, self.opts.deployment, topology))
        # (name, module, role args, TP ranks) of every compute process, chain after chain
        workers = []
        for chain in topology.chains:
            c = chain.index
            for s in chain.stages:
                args = ["--chain", str(c), "--stage", str(s.index)]
                workers.append((stage_worker_id(c, s.index), "stage_worker", args, s.tp))
            for e in chain.expert_workers:
                args = ["--chain", str(c), "--worker", str(e.index)]
                workers.append((expert_worker_id(c, e.index), "expert_worker", args, 1))
        # they all compute at once: share the cores out
        threads, sets = cpus.share(cpus.available(), [ranks for *_, ranks in workers])
        for i, (name, module, args, _) in enumerate(workers):
            bound = ["--cpus", cpus.format_list(sets[i])] if sets is not None and self.opts.cpu_bind else []
            self._spawn(name, module, *args, "--threads", str(threads), *bound)
            if module == "expert_worker" and self.opts.expert_replicas > 1:
                self.spare.add(name)
        scheduling_port = free_port()
        scheduling = f"{self.opts.host}:{scheduling_port}"
        gateway_args = ["--host", self.opts.host, "--port", str(scheduling_port)]
        if self.opts.http_port:
            gateway_args += ["--http-port", str(self.opts.http_port)]
        if not self.opts.overlap:
            gateway_args.append("--no-overlap")
        self._spawn("gateway", "gateway", *gateway_args)
        for i in range(self.frontends):
            name = f"frontend-{i}"
            self._spawn(name, "frontend", "--gateway", scheduling, "--host", self.opts.host, "--port",
                        str(self.opts.port), "--name", name)
        return topology

    def _spawn(self, name: str, module: str, *args: str) -> None:
        common = ["--redis-url", self.redis_url, "--deployment", self.opts.deployment]
        self.commands[name] = [sys.executable, "-m", module, *common, *args]
        self._popen(name)
        self.lifelines[name] = Lifeline(self.opts.restart_policy, started_at=time.monotonic())
        log.info("started %s (pid %d), log %s", name, self.procs[name].pid, self.log_dir / f"{name}.log")

    def _popen(self, name: str) -> None:
        logfile = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            self.commands[name],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        logfile.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the client port answers SERVING (a frontend linked to a ready gateway); a child
        that exits first is an error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            if serving_sync(self.gateway_address):
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

    def supervise(self, now: float | None = None) -> None:
        """Once ready: restart the workers that exited (see the module NOTE); RuntimeError when
        the gateway exited (it is not restarted), or when a worker exited and ``restart`` is off."""
        if not self.opts.restart:
            self.check_children()
            return
        gateway = self.procs["gateway"]
        if gateway.poll() is not None:
            raise RuntimeError(
                f"the gateway exited with code {gateway.returncode}; stagemesh up does not restart the gateway, "
                f"so it stops the mesh:\n{_tail(self.log_dir / 'gateway.log')}"
            )
        now = time.monotonic() if now is None else now
        for name, proc in list(self.procs.items()):
            if name != "gateway" and name not in self._gone and proc.poll() is not None:
                self._restart(name, proc.returncode, now)

    def _restart(self, name: str, code: int, now: float) -> None:
        """Start an exited worker again once its backoff is over (or give it up)."""
        life = self.lifelines[name]
        if life.restart_at is None:
            if life.died(now) is None:
                self._gone.add(name)
                log.error("%s exited with code %d (%d quick deaths in a row): giving up on it; its chain stays "
                          "out of service; see %s", name, code, life.quick_deaths, self.log_dir / f"{name}.log")
                return
            log.warning("%s exited with code %d; restarting it in %.1f s", name, code, life.restart_at - now)
        if now >= life.restart_at:
            self._popen(name)
            life.restarted(now)
            log.warning("restarted %s (pid %d, restart %d)", name, self.procs[name].pid, life.restarts)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the frontends, the gateway, then the workers; SIGKILL what is left after ``grace``; stop Redis."""
        order = sorted(self.procs, key=lambda n: (not n.startswith("frontend"), n != "gateway"))
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


async def _write_topology(url: str, deployment: str, topology: Topology) -> None:
    store = await Store.connect(url, deployment)
    try:
        await store.set_topology(topology)
    finally:
        await store.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _try(address: str, prompt: str) -> None:
    from stagemesh.client import Client
    from stagemesh.errors import StagemeshError

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
        stages = len(topology.chains[0].stages)
        experts = f" + {opts.ep} expert worker(s) x {opts.expert_replicas} replica(s)" if opts.ep else ""
        print(
            f"stagemesh ready: gateway {mesh.gateway_address} ({mesh.frontends} frontend(s)) | {opts.dp} chain(s) of "
            f"{stages} stage worker(s) "
            f"x tp {opts.tp}{experts} "
            f"on {opts.device} | redis {mesh.redis_url} | logs {mesh.log_dir}",
            flush=True,
        )
        if opts.try_prompt:
            _try(mesh.gateway_address, opts.try_prompt)
        while not stop["requested"]:
            mesh.supervise()
            time.sleep(0.5)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        mesh.stop()
