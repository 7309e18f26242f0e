"""A stagemesh mesh over two "hosts" (``tests.integration.netns.HostPair``), started the way
`stagemesh up` starts its processes (``stagemesh.deploy.launch``) but each inside its host's
network namespace, and each worker advertising its host's address.

Host A runs Redis (bound to A's address on the link, with the password of ``stagemesh certs``),
the gateway, one frontend and the agent (``tests.integration.netns_agent``) that makes the
client's calls; each stage and expert worker runs on the host that ``place(worker id)`` names. The topology
is the one planner's (``up_plan.plan_topology``) with ``advertise`` giving each worker
``HOST_IP:PORT``, signed with the mesh key, as `stagemesh up` writes it. Mutual TLS is on between
every process (the certificates of ``stagemesh certs``); each child gets ``STAGEMESH_REDIS_URL``
and ``STAGEMESH_TLS_DIR`` in its environment, as `stagemesh up`'s children do.

NOTE: ports are fixed (``WORKER_PORT`` + n on each host, the gateway's and the frontend's below):
the namespaces are new, nothing else listens in them.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from stagemesh.deploy.certs import REDIS_PASSWORD_FILE, make_secrets
from stagemesh.deploy.redis_server import find_redis_server
from stagemesh.deploy.up_plan import UpOptions, plan_topology
from stagemesh.mesh.topology import Topology
from stagemesh.runtime.procs import die_with_parent
from stagemesh.runtime.startup import REDIS_URL_ENV
from stagemesh.runtime.tls import TLS_DIR_ENV
from tests.integration.netns import Host, HostPair

REPO = Path(__file__).resolve().parents[2]
REDIS_PORT = 6379
GATEWAY_PORT = 50051
CLIENT_PORT = 50052
FRONTEND_OWN_PORT = 50053
WORKER_PORT = 50100
DEPLOYMENT = "twohosts"
READY_S = 120.0


@dataclass
class TwoHostMesh:
    """The running mesh: its hosts, its processes, and the agent that speaks for its clients."""

    hosts: HostPair
    topology: Topology
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    agent: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        """The frontend's client port, as seen from host A."""
        return f"127.0.0.1:{CLIENT_PORT}"

    def ask(self, op: str, wait_s: float = 120.0, **args) -> dict:
        """One agent command (``netns_agent``); its answer, or AssertionError with its error and the logs."""
        self.agent.stdin.write(json.dumps({"op": op, "addr": self.addr, **args}) + "\n")
        self.agent.stdin.flush()
        line = _read_line(self.agent, wait_s)
        answer = json.loads(line) if line else {"error": f"the agent answered nothing (exit {self.agent.poll()})"}
        if isinstance(answer, dict) and "error" in answer:
            raise AssertionError(f"{op}: {answer['error']}\n{self.logs()}")
        return answer

    def logs(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.log_dir.glob("*.log")))

    def dead(self) -> list[str]:
        """The processes that exited."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def plan(model_dir: Path, place: Callable[[str], Host], **layout) -> Topology:
    """``stagemesh up``'s plan of ``layout`` on CPU, each worker at ``place(worker id)``'s address."""
    ports: dict[str, int] = {}

    def advertise(worker_id: str, devices: list[str]) -> str:
        host = place(worker_id)
        ports[host.ns] = ports.get(host.ns, WORKER_PORT - 1) + 1
        return f"{host.ip}:{ports[host.ns]}"

    return plan_topology(UpOptions(model=model_dir, device="cpu", deployment=DEPLOYMENT, advertise=advertise, **layout))


@contextmanager
def two_host_mesh(model_dir: Path, work: Path, place_of: Callable[[HostPair], Callable[[str], Host]],
                  gateway_args: tuple[str, ...] = (), **layout) -> Iterator[TwoHostMesh]:
    """The mesh of ``layout`` over two new hosts, ready (every chain in service); all of it —
    processes and namespaces — gone afterwards, whatever happened."""
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    tls_dir = work / "tls"
    make_secrets(tls_dir)
    password = (tls_dir / REDIS_PASSWORD_FILE).read_text().strip()
    with HostPair() as hosts:
        mesh = TwoHostMesh(hosts, plan(model_dir, place_of(hosts), **layout), log_dir)
        env = {REDIS_URL_ENV: f"redis://:{password}@{hosts.a.ip}:{REDIS_PORT}/0", TLS_DIR_ENV: str(tls_dir)}
        try:
            _start(mesh, env, tls_dir, work, gateway_args)
            yield mesh
        finally:
            _stop(mesh)


def _start(mesh: TwoHostMesh, env: dict[str, str], tls_dir: Path, work: Path, gateway_args: tuple[str, ...]) -> None:
    a = mesh.hosts.a
    (work / "redis").mkdir(exist_ok=True)
    # the config file holds requirepass (never argv); bound to A's address on the link, so B reaches it
    _spawn(mesh, "redis", a, [find_redis_server(), str(tls_dir / "redis.conf"), "--port", str(REDIS_PORT),
                              "--bind", a.ip, "--save", "", "--appendonly", "no", "--dir", str(work / "redis")], env)
    mesh.agent = _spawn(mesh, "agent", a, [sys.executable, "-m", "tests.integration.netns_agent"], env, pipes=True)
    _wait_for_redis(mesh)
    mesh.ask("write_topology", topology=mesh.topology.to_json(), deployment=DEPLOYMENT)
    hosts = {mesh.hosts.a.ip: mesh.hosts.a, mesh.hosts.b.ip: mesh.hosts.b}
    common = ["--deployment", DEPLOYMENT]
    for chain in mesh.topology.chains:
        for s in chain.stages:
            host = hosts[s.address.rpartition(":")[0]]
            _spawn(mesh, f"stage-c{chain.index}-s{s.index}", host,
                   [sys.executable, "-m", "stage_worker", *common, "--chain", str(chain.index), "--stage", str(s.index),
                    "--threads", "1", "--topology-wait-s", "60"], env)
        for e in chain.expert_workers:
            host = hosts[e.address.rpartition(":")[0]]
            _spawn(mesh, f"expert-c{chain.index}-e{e.index}", host,
                   [sys.executable, "-m", "expert_worker", *common, "--chain", str(chain.index), "--worker", str(e.index),
                    "--threads", "1", "--topology-wait-s", "60"], env)
    _spawn(mesh, "gateway", a, [sys.executable, "-m", "gateway", *common, "--host", "127.0.0.1",
                                "--port", str(GATEWAY_PORT), *gateway_args], env)
    _spawn(mesh, "frontend-0", a, [sys.executable, "-m", "frontend", *common, "--gateway", f"127.0.0.1:{GATEWAY_PORT}",
                                   "--host", "127.0.0.1", "--port", str(CLIENT_PORT), "--own-port",
                                   str(FRONTEND_OWN_PORT), "--name", "frontend-0", "--topology-wait-s", "60"], env)
    for chain in mesh.topology.chains:
        mesh.ask("wait_chain", READY_S + 5, chain=chain.index, healthy=True, timeout=READY_S)


def _wait_for_redis(mesh: TwoHostMesh) -> None:
    """Until host A's Redis takes connections (the topology write would fail before)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(mesh.hosts.a.argv("bash", "-c", f"exec 3<>/dev/tcp/{mesh.hosts.a.ip}/{REDIS_PORT}"),
                               check=False, capture_output=True)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"redis-server did not listen on {mesh.hosts.a.ip}:{REDIS_PORT}\n{mesh.logs()}")


def _spawn(mesh: TwoHostMesh, name: str, host: Host, argv: list[str], env: dict[str, str],
           pipes: bool = False) -> subprocess.Popen:
    with open(mesh.log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            host.argv(*argv), cwd=REPO, env={**os.environ, **env}, preexec_fn=die_with_parent,  # noqa: PLW1509 - from the main thread
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else log, stderr=log, text=pipes,
        )
    mesh.procs[name] = proc
    return proc


def _stop(mesh: TwoHostMesh, grace: float = 10.0) -> None:
    """SIGTERM the agent, the frontend and the gateway, then the workers, then Redis; SIGKILL what outlives ``grace``."""
    order = sorted(mesh.procs, key=lambda n: (n == "redis", n.startswith("stage")))
    for name in order:
        if mesh.procs[name].poll() is None:
            mesh.procs[name].terminate()
    deadline = time.monotonic() + grace
    for proc in mesh.procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
