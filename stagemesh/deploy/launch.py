"""`stagemesh up`: plan a layout, start Redis, the stage workers, the gateway and the frontends,
stop them all.

NOTE: every worker is a separate local process (`python -m stage_worker`, `python -m gateway`,
`python -m frontend`) exactly as compose would run them, so `up` exercises the real mesh. The
launcher writes the planned topology to Redis; workers and the gateway read it from there.
Children get PR_SET_PDEATHSIG so they die with the launcher even when it is SIGKILLed.

Supervision (``Mesh.supervise``, every ``SUPERVISE_S`` once the mesh is ready): every child
that exits is started again with the same command line, so on the same ports, after a backoff
(``stagemesh.deploy.supervise``):

- a stage or expert worker registers again and the gateway puts its chain back in service;
- the gateway comes back on the same Scheduling and HTTP ports, and the frontends, which
  reconnect by themselves, reattach to it;
- a frontend comes back on the shared client port (its clients retry on the others meanwhile);
- a local Redis (no ``--redis-url``) comes back on the same port and data dir, so it reloads
  its append-only file; should it come back empty, the launcher writes the topology again at
  once (the gateway's ``StoreKeeper`` then rebuilds the rest) and the workers register again.

A death counts toward giving a process up only when it had not served since its last start:
the launcher probes the gRPC health of each worker, of the gateway and of each frontend (on
its ``--own-port``: the client port is shared) until it answers SERVING. A worker given up
on leaves its chain out of service; the gateway given up on (or every frontend) stops `up`
with an error, since then nothing can serve. ``restart=False``
(``--no-restart``) stops the mesh when a worker exits instead, except an expert worker whose
experts all have other replicas.

NOTE: over 400 lines. Two concerns share it: planning (``UpOptions``, ``plan_topology``, which
`stagemesh compose` reuses) and the life of the processes (``Mesh``). Planning belongs in a
module of its own; the move waits for a change that has time to carry the callers and the tests
that patch ``launch._visible_gpus`` along.
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
from stagemesh.deploy.redis_server import LocalRedis, start_local_redis
from stagemesh.deploy.supervise import Lifeline, RestartPolicy
from stagemesh.errors import StagemeshError
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
from stagemesh.v1 import scheduling_pb2

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
SCHEDULING_SERVICE = scheduling_pb2.DESCRIPTOR.services_by_name["Scheduling"].full_name
SUPERVISE_S = 0.5
"""How often ``run_up`` supervises the children (restarts, readiness probes, Redis)."""
PROBE_TIMEOUT_S = 0.5
"""A readiness probe's deadline: probes run one after the other in the supervise loop, and only
for children not yet seen SERVING since their start."""
REDIS_WAIT_S = 60.0
"""How long a worker or frontend waits at startup for Redis and the topology (``--topology-wait-s``):
past a restart of Redis, and past the topology being written again after Redis came back empty."""


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
    """The HTTP port, served by every frontend: the OpenAI-compatible API, and the gateway's dashboard,
    ``/api/status``, ``/metrics`` and ``/healthz`` passed through from its own private HTTP port; None: none."""
    served_model_name: str | None = None
    """The model's name in the OpenAI API; None: the checkpoint directory's name."""
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
    """Restart a worker, the gateway or a frontend that exits (False: its exit stops the mesh)."""
    overlap: bool = True
    """Overlap scheduling (the gateway's ``--no-overlap`` when False)."""
    max_num_seqs: int | None = None
    """The gateway's ``--max-num-seqs`` (None: its default)."""
    max_waiting: int | None = None
    """The gateway's ``--max-waiting``: requests a chain queues before refusing RESOURCE_EXHAUSTED."""
    failover_wait_s: float | None = None
    """The gateway's ``--failover-wait-s``: how long a running request waits for a chain."""
    resume_window_s: float | None = None
    """The gateway's ``--resume-window-s``: how long a request whose frontend died waits to be resumed."""
    fault_injection: bool = False
    """Serve the workers' ``Admin.InjectFault`` (``--enable-fault-injection``): for chaos tests only."""
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
        self.redis: LocalRedis | None = None
        """The local redis-server, when `up` started one (no ``--redis-url``)."""
        self.redis_life: Lifeline | None = None
        self.redis_url = opts.redis_url
        self.topology: Topology | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        """Each child's command line, to start it again the same way (same port)."""
        self.lifelines: dict[str, Lifeline] = {}
        self.addresses: dict[str, tuple[str, str]] = {}
        """The gRPC address of each child that has one of its own (workers, the gateway): its readiness probe."""
        self._next_probe = 0.0
        self.spare: set[str] = set()
        """Children whose exit the mesh outlives: expert workers whose experts all have other replicas."""
        self._gone: set[str] = set()
        """Children that exited for good (spare ones, and workers given up on)."""
        self.log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="stagemesh-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.frontends = opts.frontends if opts.frontends is not None else default_frontends()
        self.gateway_http_port: int | None = None
        """The gateway's private HTTP port, which the frontends' ``http_port`` passes through."""
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
        topology = self.topology = plan_topology(self.opts)
        if self.redis_url is None:
            self.redis = start_local_redis(data_dir=self.log_dir / "redis")
            self.redis_life = Lifeline(self.opts.restart_policy, started_at=time.monotonic(), probed=True)
            self.redis_life.became_ready(time.monotonic())
            self.redis_url = self.redis.url
        asyncio.run(_write_topology(self.redis_url, self.opts.deployment, topology))
        self._spawn_workers(topology)
        scheduling_port = free_port()
        scheduling = f"{self.opts.host}:{scheduling_port}"
        gateway_args = ["--host", self.opts.host, "--port", str(scheduling_port)]
        http = self._http_args()
        if http:
            gateway_args += ["--http-port", str(self.gateway_http_port)]
        if not self.opts.overlap:
            gateway_args.append("--no-overlap")
        for flag, value in (("--max-num-seqs", self.opts.max_num_seqs), ("--max-waiting", self.opts.max_waiting),
                            ("--failover-wait-s", self.opts.failover_wait_s),
                            ("--resume-window-s", self.opts.resume_window_s)):
            if value is not None:
                gateway_args += [flag, str(value)]
        # its overall health is NOT_SERVING while no chain serves: its readiness is its service's
        self._spawn("gateway", "gateway", *gateway_args, address=scheduling, service=SCHEDULING_SERVICE)
        wait = ["--topology-wait-s", str(REDIS_WAIT_S)]
        for i in range(self.frontends):
            name, own = f"frontend-{i}", free_port()  # its own port: the launcher probes it there
            self._spawn(name, "frontend", "--gateway", scheduling, "--host", self.opts.host, "--port",
                        str(self.opts.port), "--own-port", str(own), "--name", name, *http, *wait,
                        address=f"{self.opts.host}:{own}")
        return topology

    def _http_args(self) -> list[str]:
        """The frontends' HTTP flags (none without ``http_port``). NOTE: the frontends serve the
        public HTTP port (the OpenAI API) and pass the gateway's pages through from a private port
        of its own, chosen once so that a restarted gateway comes back on it."""
        if not self.opts.http_port:
            return []
        self.gateway_http_port = self.gateway_http_port or free_port()
        args = ["--http-port", str(self.opts.http_port), "--gateway-http", f"{self.opts.host}:{self.gateway_http_port}"]
        if self.opts.served_model_name:
            args += ["--served-model-name", self.opts.served_model_name]
        return args

    def _spawn_workers(self, topology: Topology) -> None:
        """Every stage and expert worker, chain after chain, with the cores shared out among them."""
        # (name, module, role args, TP ranks, address) of every compute process
        workers = []
        for chain in topology.chains:
            c = chain.index
            for s in chain.stages:
                args = ["--chain", str(c), "--stage", str(s.index)]
                workers.append((stage_worker_id(c, s.index), "stage_worker", args, s.tp, s.address))
            for e in chain.expert_workers:
                args = ["--chain", str(c), "--worker", str(e.index)]
                workers.append((expert_worker_id(c, e.index), "expert_worker", args, 1, e.address))
        # they all compute at once: share the cores out
        threads, sets = cpus.share(cpus.available(), [ranks for _, _, _, ranks, _ in workers])
        for i, (name, module, args, _, address) in enumerate(workers):
            bound = ["--cpus", cpus.format_list(sets[i])] if sets is not None and self.opts.cpu_bind else []
            faults = ["--enable-fault-injection"] if self.opts.fault_injection else []
            self._spawn(name, module, *args, "--threads", str(threads), *bound, *faults,
                        "--topology-wait-s", str(REDIS_WAIT_S), address=address)
            if module == "expert_worker" and self.opts.expert_replicas > 1:
                self.spare.add(name)

    def _spawn(self, name: str, module: str, *args: str, address: str | None = None, service: str = "") -> None:
        """Start a child; with ``address``, its readiness is probed there: the health of
        ``service`` ("": the server as a whole; see the module NOTE)."""
        common = ["--redis-url", self.redis_url, "--deployment", self.opts.deployment]
        self.commands[name] = [sys.executable, "-m", module, *common, *args]
        if address is not None:
            self.addresses[name] = (address, service)
        self._popen(name)
        probed = address is not None
        self.lifelines[name] = Lifeline(self.opts.restart_policy, started_at=time.monotonic(), probed=probed)
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
        """Once ready: restart Redis and the children that exited (see the module NOTE);
        RuntimeError when nothing can serve any more (the gateway or every frontend given up on),
        or when a worker exited and ``restart`` is off."""
        now = time.monotonic() if now is None else now
        self._keep_redis(now)
        if not self.opts.restart:
            self.check_children()
            return
        self._probe(now)
        for name, proc in list(self.procs.items()):
            if name not in self._gone and proc.poll() is not None:
                self._restart(name, proc.returncode, now)
        self._check_servable()

    def _probe(self, now: float) -> None:
        """Mark the children that answer SERVING ready; only those not yet ready since their start,
        at most every ``SUPERVISE_S``."""
        if now < self._next_probe:
            return
        self._next_probe = now + SUPERVISE_S
        for name, (address, service) in self.addresses.items():
            life = self.lifelines[name]
            if life.awaits_ready and self.procs[name].poll() is None and serving_sync(address, PROBE_TIMEOUT_S,
                                                                                     service):
                life.became_ready(now)
                if life.restarts:
                    log.info("%s serves again (restart %d)", name, life.restarts)

    def _check_servable(self) -> None:
        """RuntimeError when no process is left to serve clients."""
        if "gateway" in self._gone:
            raise RuntimeError(
                "the gateway was given up on (it exited again and again before serving), so nothing can serve: "
                f"stagemesh up stops the mesh; the gateway's log ends with:\n{_tail(self.log_dir / 'gateway.log')}"
            )
        frontends = [name for name in self.procs if name.startswith("frontend")]
        if frontends and all(name in self._gone for name in frontends):
            raise RuntimeError(
                "every frontend was given up on, so no client can reach the mesh: stagemesh up stops it; "
                f"frontend-0's log ends with:\n{_tail(self.log_dir / 'frontend-0.log')}"
            )

    def _restart(self, name: str, code: int, now: float) -> None:
        """Start an exited child again once its backoff is over (or give it up)."""
        life = self.lifelines[name]
        if life.restart_at is None:
            if life.died(now) is None:
                self._gone.add(name)
                log.error("%s exited with code %d (%d deaths in a row before serving): giving up on it; see %s",
                          name, code, life.quick_deaths, self.log_dir / f"{name}.log")
                return
            log.warning("%s exited with code %d; restarting it in %.1f s", name, code, life.restart_at - now)
        if now >= life.restart_at:
            self._popen(name)
            life.restarted(now)
            log.warning("restarted %s (pid %d, restart %d)", name, self.procs[name].pid, life.restarts)

    def _keep_redis(self, now: float) -> None:
        """Start the local Redis again when it died (same port and data dir: it reloads its
        append-only file), then write the topology back if it came back without one.

        NOTE: a Redis that had served is started again at once, not after ``first_backoff_s``:
        every process is waiting for it. Failed starts back off and give up like any child's.
        """
        life = self.redis_life
        if self.redis is None or life is None or self.redis.running():
            return
        if life.restart_at is None:
            if life.died(now) is None:
                raise RuntimeError(
                    f"redis-server keeps failing to start; its log ends with:\n{_tail(self.redis.log_path)}"
                )
            if life.quick_deaths == 0:
                life.restart_at = now
            log.warning("redis-server (port %d) exited with code %s; restarting it",
                        self.redis.port, self.redis.returncode)
        if now < life.restart_at:
            return
        life.restarted(now)
        try:
            self.redis.restart()
        except RuntimeError as err:
            log.error("could not restart redis-server: %s", err)  # not ready: this death counts
            return
        life.became_ready(now)
        self._rewrite_topology()

    def _rewrite_topology(self) -> None:
        """The topology back into a Redis that came back without it (the workers need it to start)."""
        try:
            if asyncio.run(_write_topology(self.redis_url, self.opts.deployment, self.topology, if_absent=True)):
                log.warning("Redis came back empty: the topology is written again; the workers register again")
        except StagemeshError as err:
            log.error("could not write the topology back to Redis: %s", err.message)

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


async def _write_topology(url: str, deployment: str, topology: Topology, *, if_absent: bool = False) -> bool:
    """Write ``topology`` (with ``if_absent``, only where there is none); whether it wrote it."""
    store = await Store.connect(url, deployment)
    try:
        if if_absent:
            return await store.set_topology_if_absent(topology)
        await store.set_topology(topology)
        return True
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


def _http_line(opts: UpOptions) -> str:
    if not opts.http_port:
        return ""
    return f" | http http://{opts.host}:{opts.http_port} (OpenAI API /v1, dashboard /, /metrics)"


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
            f"on {opts.device}{_http_line(opts)} | redis {mesh.redis_url} | logs {mesh.log_dir}",
            flush=True,
        )
        if opts.try_prompt:
            _try(mesh.gateway_address, opts.try_prompt)
        while not stop["requested"]:
            mesh.supervise()
            time.sleep(SUPERVISE_S)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        mesh.stop()
