"""The life of the processes of `stagemesh up`: start Redis, the stage and expert workers, the
gateway and the frontends of a planned topology (``stagemesh.deploy.up_plan``), supervise them,
stop them all (``stagemesh.deploy.up`` is the command around it).

NOTE: every worker is a separate local process (`python -m stage_worker`, `python -m gateway`,
`python -m frontend`) exactly as compose would run them, so `up` exercises the real mesh. The
launcher writes the planned topology to Redis; workers and the gateway read it from there.
Children get PR_SET_PDEATHSIG so they die with the launcher even when it is SIGKILLed.
Unless ``--insecure``, the mesh talks mutual TLS with certificates made for the run and its local
Redis asks for a generated password; children get both through their environment, never their
command line (``stagemesh.deploy.run_secrets``), and the launcher probes them with its own
``admin`` certificate.

Supervision (``Mesh.supervise``, every ``SUPERVISE_S`` once the mesh is ready): every child
that exits is started again with the same command line, so on the same ports, after a backoff
(``stagemesh.deploy.supervise``):

- a stage or expert worker registers again and the gateway puts its chain back in service;
- the gateway comes back on the same Scheduling and HTTP ports, and the frontends, which
  reconnect by themselves, reattach to it; with ``--standby-gateway`` a second gateway has
  taken over already (``gateway.lead``) and the restarted one becomes the next standby;
- a frontend comes back on the shared client port (its clients retry on the others meanwhile);
  with ``--spare-frontends`` a warm spare has taken its place already, and it becomes a spare;
- a local Redis (no ``--redis-url``) comes back on the same port and data dir, so it reloads
  its append-only file; should it come back empty, the launcher writes the topology again at
  once (the gateway's ``StoreKeeper`` then rebuilds the rest) and the workers register again.

A death counts toward giving a process up only when it had not served since its last start:
the launcher probes the gRPC health of each worker, of the gateway and of each frontend (on
its ``--own-port``: the client port is shared) until it answers SERVING. A worker given up
on leaves its chain out of service; the gateway given up on (both, with a standby) or every
frontend stops `up` with an error, since then nothing can serve. ``restart=False``
(``--no-restart``) stops the mesh when a worker exits instead, except an expert worker whose
experts all have other replicas.

A worker, the gateway or a frontend that served and then answered no health check for
``--liveness-s`` (frozen) is SIGKILLed, and so restarted (``stagemesh.deploy.liveness``); the
local Redis likewise (``stagemesh.deploy.redis_keeper``). Each child also gets the flag: one whose
event loop stands still that long ends itself (``stagemesh.runtime.watchdog``).

NOTE: over 400 lines, a sixth of them this docstring: ``Mesh`` is one concern (start,
supervise, stop); planning is ``up_plan.py``, the command ``up.py``, the local Redis's keeping
``redis_keeper.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stagemesh.deploy.liveness import Liveness
from stagemesh.deploy.redis_keeper import RedisKeeper
from stagemesh.deploy.redis_server import LocalRedis, log_tail, start_local_redis
from stagemesh.deploy.run_secrets import RunSecrets, child_env
from stagemesh.deploy.supervise import Lifeline
from stagemesh.deploy.up_plan import UpOptions, default_frontends, plan_topology, write_topology
from stagemesh.errors import StagemeshError
from stagemesh.mesh.signing import Signer, load_signer
from stagemesh.mesh.store import expert_worker_id, stage_worker_id
from stagemesh.mesh.topology import Topology
from stagemesh.runtime import cpus
from stagemesh.runtime.health import retry_after, serving_sync
from stagemesh.runtime.net import free_port, port_in_use, reserve
from stagemesh.runtime.procs import die_with_parent
from stagemesh.runtime.tls import MeshTLS
from stagemesh.v1 import scheduling_pb2

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
SCHEDULING_SERVICE = scheduling_pb2.DESCRIPTOR.services_by_name["Scheduling"].full_name
SUPERVISE_S = 0.5
"""How often ``run_up`` supervises the children (restarts, readiness probes, Redis)."""
PROBE_TIMEOUT_S = 0.5
"""A readiness probe's deadline: probes run one after the other in the supervise loop, and only
for children not yet seen SERVING since their start."""
KILL_WAIT_S = 1.0
"""How long the supervision waits for a frozen child it SIGKILLed to exit before it goes on."""
LOOPBACK = "127.0.0.1"
"""Where the gateway's private HTTP port listens under `up` (its frontends are local)."""
STANDBY_PAIR = ("gateway-a", "gateway-b")
"""The gateway processes of ``--standby-gateway``: either may lead, so neither is named the standby."""
REDIS_WAIT_S = 60.0
"""How long a worker or frontend waits at startup for Redis and the topology (``--topology-wait-s``):
past a restart of Redis, and past the topology being written again after Redis came back empty."""



class Mesh:
    """The processes of one `stagemesh up`."""

    def __init__(self, opts: UpOptions):
        self.opts = opts
        self.redis_keeper: RedisKeeper | None = None
        """The local redis-server, when `up` started one (no ``--redis-url``), and its restarts."""
        self.redis_url = opts.redis_url
        self.secrets: RunSecrets | None = None
        """The run's certificates and Redis password (None with ``insecure``), made by ``start``."""
        self.topology: Topology | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        """Each child's command line, to start it again the same way (same port)."""
        self.lifelines: dict[str, Lifeline] = {}
        self.addresses: dict[str, tuple[str, str]] = {}
        """The gRPC address of each child that has one of its own (workers, the gateway): its readiness probe."""
        self._next_probe = 0.0
        self._liveness: Liveness | None = None
        """The watch of the children that served (``--liveness-s``), from the first ``supervise``."""
        self.spare: set[str] = set()
        """Children whose exit the mesh outlives: expert workers whose experts all have other replicas."""
        self._gone: set[str] = set()
        """Children that exited for good (spare ones, and workers given up on)."""
        self.frontends = opts.frontends if opts.frontends is not None else default_frontends()
        self.gateway_http_port: int | None = None
        """The gateway's private HTTP port, which the frontends' ``http_port`` passes through."""
        self._key_dir: Path | None = None
        """A directory of this user's alone holding the API keys' file (``_api_key_args``)."""
        if self.frontends < 1:
            raise ValueError(f"frontends={self.frontends}: a mesh needs at least one frontend to serve clients")
        if opts.micro_batches is not None and opts.micro_batches < 1:
            raise ValueError(f"micro_batches={opts.micro_batches}: a chain needs at least one micro-batch in flight")
        self.micro_batches: int | None = opts.micro_batches
        """The gateway's ``--micro-batches`` (None: one per stage); on CPU ``_spawn_workers`` picks it."""
        self.log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="stagemesh-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.temp_log_dir = opts.log_dir is None
        """The log dir is a temporary one of its own: ``stop`` removes it unless asked to keep the logs."""
        self.log_offsets: dict[str, int] = {}
        """Where each child's latest start begins in its log (a ``--log-dir`` may hold earlier runs')."""

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
            if port:
                reserve(port)  # the frontends bind it last: no worker planned now may get it
        topology = self.topology = plan_topology(self.opts)
        if not self.opts.insecure:
            self.secrets = RunSecrets.create(self.opts.tls_dir)
        if self.redis_url is None:
            redis = start_local_redis(
                data_dir=self.log_dir / "redis", password=self.secrets.redis_password if self.secrets else None,
                secrets_dir=self.secrets.directory if self.secrets else None)
            self.redis_keeper = RedisKeeper(redis, self.opts.restart_policy, self.opts.liveness_s,
                                            on_back=self._rewrite_topology)
            self.redis_url = redis.url
        if self.secrets is not None:
            self.secrets.write_redis_url(self.redis_url)
        asyncio.run(write_topology(self.redis_url, self.opts.deployment, topology, signer=self.signer))
        self._spawn_workers(topology)
        scheduling_port = free_port()
        scheduling = f"{self.opts.host}:{scheduling_port}"
        gateway_args = ["--host", self.opts.host, "--port", str(scheduling_port)]
        http = self._http_args()
        if http:
            # loopback whatever --host says: its pages ask for no API key; the frontends pass them through
            gateway_args += ["--http-port", str(self.gateway_http_port), "--http-host", LOOPBACK]
        if not self.opts.overlap:
            gateway_args.append("--no-overlap")
        if self.micro_batches is not None:
            gateway_args += ["--micro-batches", str(self.micro_batches)]
        for flag, value in (("--max-num-seqs", self.opts.max_num_seqs), ("--max-waiting", self.opts.max_waiting),
                            ("--failover-wait-s", self.opts.failover_wait_s),
                            ("--resume-window-s", self.opts.resume_window_s)):
            if value is not None:
                gateway_args += [flag, str(value)]
        self._spawn_gateways(gateway_args, scheduling)
        wait = ["--topology-wait-s", str(REDIS_WAIT_S)]
        for i in range(self.frontends + self.opts.spare_frontends):
            name, own = f"frontend-{i}", free_port()  # its own port: the launcher probes it there
            self._spawn(name, "frontend", "--gateway", scheduling, "--host", self.opts.host, "--port",
                        str(self.opts.port), "--own-port", str(own), "--name", name, *http, *wait,
                        *self._slot_args(), *self._api_key_args(), *self._serving_cert_args(),
                        address=f"{self.opts.host}:{own}")
        return topology

    def _spawn_gateways(self, args: list[str], scheduling: str) -> None:
        """The gateway; with ``standby_gateway`` a second one on the same ports, which waits for a lock
        the first holds and takes over the moment it exits (``gateway.lead``). NOTE: the two share
        one address, so a probe cannot tell which answered: like the frontends, each has served once
        it lived ``quick_s``; alone, the gateway is probed (its overall health is NOT_SERVING while no
        chain serves: its readiness is its service's)."""
        if not self.opts.standby_gateway:
            self._spawn("gateway", "gateway", *args, address=scheduling, service=SCHEDULING_SERVICE)
            return
        lock = ["--lock-file", str(self._lock_file("gateway"))]
        if self.opts.standby_fence_s is not None:
            lock += ["--fence-after-s", str(self.opts.standby_fence_s)]
        for name in STANDBY_PAIR:  # whichever locks first leads; the other's log says it waits
            self._spawn(name, "gateway", *args, *lock)

    def _slot_args(self) -> list[str]:
        """The frontends' ``--slot-files`` with ``spare_frontends``: one lock file per frontend that
        serves, so the rest wait as warm spares (``frontend.frontend.Frontend._take_slot``)."""
        if not self.opts.spare_frontends:
            return []
        return ["--slot-files", *(str(self._lock_file(f"frontend-slot-{i}")) for i in range(self.frontends))]

    def _lock_file(self, name: str) -> Path:
        """``name``'s lock file in the log dir, named for the client port too: two meshes given one
        ``--log-dir`` (never one port: ``up`` checks it) must not share a lock."""
        return self.log_dir / f"{name}-{self.opts.port}.lock"

    def _api_key_args(self) -> list[str]:
        """The frontends' ``--api-key-file`` (none without keys). NOTE: the keys go to the frontends
        in a file only this user can read (0600, in a 0700 temp dir that ``stop`` removes), never on
        a command line: every local user sees every process's argv (``ps``)."""
        if not self.opts.api_keys.enabled:
            return []
        if self._key_dir is None:
            self._key_dir = Path(tempfile.mkdtemp(prefix="stagemesh-keys-"))
            self.opts.api_keys.to_file(self._key_dir / "api-keys")
        return ["--api-key-file", str(self._key_dir / "api-keys")]

    def _serving_cert_args(self) -> list[str]:
        """The frontends' ``--tls-cert``/``--tls-key`` (none without a certificate for the client ports)."""
        cert = self.opts.serving_cert
        return [] if cert is None else ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]

    def _http_args(self) -> list[str]:
        """The frontends' HTTP flags (none without ``http_port``). NOTE: the frontends serve the
        public HTTP port (the OpenAI API) and pass the gateway's pages through from a private port
        of its own, chosen once so that a restarted gateway comes back on it."""
        if not self.opts.http_port:
            return []
        self.gateway_http_port = self.gateway_http_port or free_port()
        args = ["--http-port", str(self.opts.http_port), "--gateway-http", f"{LOOPBACK}:{self.gateway_http_port}"]
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
        cores, ranks = cpus.available(), [n for _, _, _, n, _ in workers]
        threads, sets = cpus.share(cores, ranks)
        if self.micro_batches is None and self.opts.device == "cpu":
            self.micro_batches = _fewer_micro_batches(len(cores), sum(ranks), topology, self.opts.tp)
        for i, (name, module, args, _, address) in enumerate(workers):
            bound = ["--cpus", cpus.format_list(sets[i])] if sets is not None and self.opts.cpu_bind else []
            extra = ["--enable-fault-injection"] if self.opts.fault_injection else []
            self._spawn(name, module, *args, "--threads", str(threads), *bound, *extra,
                        "--topology-wait-s", str(REDIS_WAIT_S), address=address)
            if module == "expert_worker" and self.opts.expert_replicas > 1:
                self.spare.add(name)

    @property
    def redis(self) -> LocalRedis | None:
        """The local redis-server, when `up` started one."""
        return self.redis_keeper.redis if self.redis_keeper is not None else None

    @property
    def tls(self) -> MeshTLS | None:
        """The launcher's own mesh identity (``admin``): its probes of the children; None when insecure."""
        return self.secrets.tls if self.secrets is not None else None

    @property
    def signer(self) -> Signer | None:
        """The mesh key of the run's tls dir, which signs the topology the launcher writes (the
        children load the same from ``--tls-dir``); None when insecure. ValueError when it lacks one."""
        return load_signer(self.secrets.tls_dir) if self.secrets is not None else None

    def _every_frontend_serves(self) -> bool:
        """Whether ``frontends`` frontends answer SERVING on their own ports (mesh mTLS, whatever the
        client port serves): linked to a ready gateway. A spare binds no port until it serves."""
        return sum(serving_sync(address, tls=self.tls) for name, (address, _) in self.addresses.items()
                   if name.startswith("frontend")) >= self.frontends

    def _spawn(self, name: str, module: str, *args: str, address: str | None = None, service: str = "") -> None:
        """Start a child; with ``address``, its readiness is probed there: the health of
        ``service`` ("": the server as a whole; see the module NOTE)."""
        # Redis's URL and the certificates: in the environment
        common = ["--deployment", self.opts.deployment,
                  "--liveness-s", str(self.opts.liveness_s if self.opts.restart else 0)]
        self.commands[name] = [sys.executable, "-m", module, *common, *args]
        if address is not None:
            self.addresses[name] = (address, service)
        self._popen(name)
        probed = address is not None
        self.lifelines[name] = Lifeline(self.opts.restart_policy, started_at=time.monotonic(), probed=probed)
        log.info("started %s (pid %d), log %s", name, self.procs[name].pid, self.log_dir / f"{name}.log")

    def _popen(self, name: str) -> None:
        logfile = open(self.log_dir / f"{name}.log", "ab")
        self.log_offsets[name] = logfile.tell()
        self.procs[name] = subprocess.Popen(
            self.commands[name],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            env=child_env(self.redis_url, self.secrets),
        )
        logfile.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, on_wait: Callable[[], None] | None = None) -> None:
        """Until every frontend answers SERVING (each linked to a ready gateway), so that "ready"
        means the client port spreads its connections over all of them; a child that exits first
        is an error. ``on_wait`` runs between two checks (the load progress)."""
        start = time.monotonic()
        while time.monotonic() < start + timeout:
            self.check_children()
            if self._every_frontend_serves():
                return
            if on_wait is not None:
                on_wait()
            time.sleep(retry_after(time.monotonic() - start, 0.2))
        raise RuntimeError(f"the mesh was not ready after {timeout:.0f}s; logs in {self.log_dir}")

    def worker_logs(self) -> dict[str, tuple[Path, int]]:
        """Each stage and expert worker's log and where its latest start begins in it (``LoadWatch``)."""
        return {name: (self.log_dir / f"{name}.log", self.log_offsets[name]) for name in self.procs
                if self.commands[name][2] in ("stage_worker", "expert_worker")}

    def check_children(self) -> None:
        """RuntimeError when a child exited, except a spare one (its experts' other replicas serve)."""
        for name, proc in self.procs.items():
            if proc.poll() is None or name in self._gone:
                continue
            if name in self.spare:
                log.warning("%s exited with code %d; the other replicas of its experts serve", name, proc.returncode)
                self._gone.add(name)
                continue
            tail = log_tail(self.log_dir / f"{name}.log")
            raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def supervise(self, now: float | None = None) -> None:
        """Once ready: restart Redis and the children that exited (see the module NOTE);
        RuntimeError when nothing can serve any more (the gateway or every frontend given up on),
        or when a worker exited and ``restart`` is off."""
        now = time.monotonic() if now is None else now
        if self.redis_keeper is not None:
            self.redis_keeper.keep(now)
        if not self.opts.restart:
            self.check_children()
            return
        self._probe(now)
        self._kill_silent(now)
        for name, proc in list(self.procs.items()):
            if name not in self._gone and proc.poll() is not None:
                self._restart(name, proc.returncode, now)
        self._check_servable()

    def wait_for_exit(self, timeout_s: float) -> None:
        """Sleep up to ``timeout_s``, back as soon as a child or the local Redis exits (at once if
        one did since ``supervise`` last looked), so that ``supervise`` restarts it at once (a pidfd
        per process, Linux 5.3+; elsewhere the whole ``timeout_s``)."""
        pids = []
        lives = [(proc.pid, proc.poll() is None, name in self._gone, self.lifelines.get(name))
                 for name, proc in self.procs.items()]
        if self.redis is not None:
            lives.append((self.redis.pid, self.redis.running(), False, self.redis_keeper.life))
        for pid, running, gone, life in lives:
            if running:
                pids.append(pid)  # not reaped, so the pid is still this child's
            elif not gone and life is not None and life.restart_at is None:
                return  # exited, and its death is not recorded yet
        fds: list[int] = []
        try:
            for pid in pids:
                fds.append(os.pidfd_open(pid))
            select.select(fds, [], [], timeout_s)
        except (AttributeError, OSError):  # no pidfd_open here
            time.sleep(timeout_s)
        finally:
            for fd in fds:
                os.close(fd)

    def _probe(self, now: float) -> None:
        """Mark the children that answer SERVING ready; only those not yet ready since their start,
        at most every ``SUPERVISE_S``."""
        if now < self._next_probe:
            return
        self._next_probe = now + SUPERVISE_S
        for name, (address, service) in self.addresses.items():
            life = self.lifelines[name]
            if life.awaits_ready and self.procs[name].poll() is None and serving_sync(address, PROBE_TIMEOUT_S,
                                                                                     service, self.tls):
                life.became_ready(now)
                if life.restarts:
                    log.info("%s serves again (restart %d)", name, life.restarts)

    def _kill_silent(self, now: float) -> None:
        """SIGKILL each child that served and has since answered no health check for ``liveness_s``
        (frozen: ``stagemesh.deploy.liveness``); ``supervise`` then starts it again at once."""
        if not self.opts.liveness_s:
            return
        if self._liveness is None:
            self._liveness = Liveness(self.opts.liveness_s, self.tls)
        watched = {name: (address, life.ready_at) for name, (address, _) in self.addresses.items()
                   if (life := self.lifelines[name]).ready_at is not None and self.procs[name].poll() is None}
        for name, silent_s in self._liveness.silent(watched, now):
            proc = self.procs[name]
            log.warning("%s (pid %d) has answered no health check for %.1f s: killing it to start it again "
                        "(--liveness-s %g)", name, proc.pid, silent_s, self.opts.liveness_s)
            proc.kill()
            try:
                proc.wait(KILL_WAIT_S)  # reaped here, it is restarted in this same pass
            except subprocess.TimeoutExpired:  # stuck in the kernel (a driver): restarted once it exits
                log.error("%s (pid %d) did not exit %.0f s after SIGKILL", name, proc.pid, KILL_WAIT_S)

    def _check_servable(self) -> None:
        """RuntimeError when no process is left to serve clients."""
        gateways = [name for name in self.procs if _is_gateway(name)]
        if gateways and all(name in self._gone for name in gateways):
            raise RuntimeError(
                "the gateway was given up on (it exited again and again before serving), so nothing can serve: "
                f"stagemesh up stops the mesh; the gateway's log ends with:\n"
                f"{log_tail(self.log_dir / f'{gateways[-1]}.log')}"
            )
        frontends = [name for name in self.procs if name.startswith("frontend")]
        if frontends and all(name in self._gone for name in frontends):
            raise RuntimeError(
                "every frontend was given up on, so no client can reach the mesh: stagemesh up stops it; "
                f"frontend-0's log ends with:\n{log_tail(self.log_dir / 'frontend-0.log')}"
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
            wait = life.restart_at - now
            when = f"in {wait:.1f} s" if wait > 0 else "at once"
            log.warning("%s exited with code %d; restarting it %s", name, code, when)
        if now >= life.restart_at:
            self._popen(name)
            life.restarted(now)
            log.warning("restarted %s (pid %d, restart %d)", name, self.procs[name].pid, life.restarts)

    def _rewrite_topology(self) -> None:
        """The topology back into a Redis that came back without it (the workers need it to start)."""
        try:
            if asyncio.run(write_topology(self.redis_url, self.opts.deployment, self.topology, if_absent=True,
                                           signer=self.signer)):
                log.warning("Redis came back empty: the topology is written again; the workers register again")
        except StagemeshError as err:
            log.error("could not write the topology back to Redis: %s", err.message)

    def stop(self, grace: float = 10.0, keep_logs: bool = False) -> None:
        """SIGTERM the frontends, the gateway, then the workers; SIGKILL what is left after ``grace``; stop
        Redis; remove a temporary log dir unless ``keep_logs`` (a mesh that failed: its logs say why)."""
        order = sorted(self.procs, key=_stop_order)
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
        if self._liveness is not None:
            self._liveness.close()
        if self.redis_keeper is not None:
            self.redis_keeper.stop()
        if self.secrets is not None:
            self.secrets.remove()
        if self._key_dir is not None:
            shutil.rmtree(self._key_dir, ignore_errors=True)
        if self.temp_log_dir and not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def _is_gateway(name: str) -> bool:
    return name == "gateway" or name in STANDBY_PAIR


def _stop_order(name: str) -> tuple[bool, bool]:
    """Frontends first (no new calls), then the gateway(s), then the workers. NOTE: a standby is told
    to stop while the gateway it follows drains, so it never takes over from one being stopped."""
    return not name.startswith("frontend"), not _is_gateway(name)


def _fewer_micro_batches(cores: int, ranks: int, topology: Topology, tp: int) -> int | None:
    """The gateway's ``--micro-batches`` for compute processes sharing ``cores`` CPU cores; None
    when each chain may keep one per stage (``cpus.micro_batches``)."""
    stages = len(topology.chains[0].stages)
    fit = cpus.micro_batches(cores, ranks, stages, tp, len(topology.chains))
    return fit if fit < stages else None

