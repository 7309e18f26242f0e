"""Where a compose deployment's workers run and how they reach each other: the plan `stagemesh up`
would start (``up_plan.plan_topology``, the one planner), on the GPUs of one or several hosts.

NOTE: GPUs. The one planner (``up_plan.plan_topology``) numbers GPUs across the deployment:
chain ``c`` takes the ``pp × tp + ep`` GPUs after chain ``c - 1``'s, its stages first (a stage's
TP ranks side by side), then its expert workers. Each worker service books exactly its planned
GPUs with ``device_ids`` (host-local indices: with ``--hosts``, plan GPU ``k`` is GPU
``k - first`` of the host whose range holds it, a TP stage never straddles two hosts). The
NVIDIA runtime shows a container only the GPUs it booked, renumbered from 0, so the topology
the planner service writes to Redis names devices as seen from inside: a stage's ranks are
``cuda:0 .. cuda:tp-1``, an expert worker is ``cuda:0`` (``in_container``). The renderer and
the planner service run the same plan, so what is booked and what is used agree.

NOTE: addresses. A worker listens on, and is reached at, ``SERVICE:PORT`` on the compose
network (one host), or ``HOST:PORT`` with PORT published on its host (``--hosts``). PORT is
``WORKER_PORT`` + the host-local index of the worker's first GPU: unique on its host, because no
GPU is booked twice. The gateway is in no topology: clients reach it on its published ports.
On Kubernetes (``target="k8s"``, ``stagemesh.deploy.k8s``) every worker has a pod (its own IP)
and a Service of its own: it is reached at ``stagemesh-<worker id>:WORKER_PORT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from stagemesh.mesh.layout import chain_devices
from stagemesh.mesh.store import expert_worker_id, stage_worker_id
from stagemesh.mesh.topology import Topology

WORKER_PORT = 50100
"""A worker's port is this plus the host-local index of its first GPU (on Kubernetes: this)."""
DEFAULT_GPUS = 8
TARGETS = ("compose", "k8s")
"""Where a plan runs, which says how its workers are addressed (``advertise``)."""
K8S_PREFIX = "stagemesh-"
"""On Kubernetes, every object's name starts with this; a worker's Service is it plus the worker's id."""


@dataclass(frozen=True)
class Host:
    """One GPU machine of a multi-host deployment (``--hosts NAME:GPUS,...``)."""

    name: str
    """How the other hosts' containers reach it (DNS name or IP)."""
    gpus: int


@dataclass(frozen=True)
class Layout:
    """A stagemesh layout on GPU hosts: what `stagemesh compose` renders and `stagemesh topology` writes."""

    model: Path
    """Checkpoint directory the plan reads ``config.json`` from."""
    pp: int = 1
    tp: int = 1
    ep: int = 0
    dp: int = 1
    expert_replicas: int = 1
    gpus: int = DEFAULT_GPUS
    """GPUs of the one host (ignored with ``hosts``)."""
    hosts: tuple[Host, ...] = ()
    """Several hosts, in GPU order: the first runs Redis, the planner, the gateway and monitoring."""
    deployment: str = "default"
    dtype: str | None = None
    kv_blocks: int | None = None
    target: str = "compose"
    """One of ``TARGETS``: compose (service or host names) or k8s (a Service per worker)."""
    device: str = "cuda"
    """cuda (one GPU per TP rank and per expert worker) or cpu (no GPUs booked; Kubernetes only)."""

    @property
    def total_gpus(self) -> int:
        return sum(h.gpus for h in self.hosts) if self.hosts else self.gpus

    def locate(self, gpu: int) -> tuple[str | None, int]:
        """(host name, or None on one host; host-local index) of plan GPU ``gpu``."""
        first = 0
        for host in self.hosts:
            if gpu < first + host.gpus:
                return host.name, gpu - first
            first += host.gpus
        if not self.hosts and gpu < self.gpus:
            return None, gpu
        raise ValueError(f"GPU {gpu} of the plan is beyond the {self.total_gpus} GPUs given")


@dataclass(frozen=True)
class Worker:
    """One stage or expert worker service of the plan."""

    name: str
    """Service name and registry id, e.g. ``stage-c0-s1``."""
    module_args: tuple[str, ...]
    """Its ``python -m`` module and role arguments, e.g. ``("stage_worker", "--chain", "0", "--stage", "1")``."""
    address: str
    gpus: tuple[int, ...]
    """Plan GPU indices (global), rank 0's first."""


# --- planning ------------------------------------------------------------------------------


def plan(layout: Layout) -> Topology:
    """The topology `stagemesh up` would plan for ``layout`` on its device, with its target's addresses
    and plan-wide GPU numbers; ValueError when the GPUs given cannot take it."""
    from stagemesh.deploy.up_plan import UpOptions, plan_topology

    if layout.target not in TARGETS:
        raise ValueError(f"target {layout.target!r} is not one of {', '.join(TARGETS)}")
    if layout.device == "cpu" and layout.target != "k8s":
        raise ValueError("--device cpu needs --target k8s: a compose service books GPUs")
    needed = layout.dp * chain_devices(layout.pp, layout.tp, layout.ep)
    # On Kubernetes the scheduler finds each pod a node with its GPUs: the plan only numbers them.
    gpus = needed if layout.target == "k8s" else layout.total_gpus
    if layout.device == "cuda" and needed > gpus:
        given = f"--hosts gives {layout.total_gpus}" if layout.hosts else f"--gpus is {layout.gpus}"
        raise ValueError(
            f"the layout dp={layout.dp} x (pp={layout.pp} x tp={layout.tp} + ep={layout.ep}) needs {needed} GPUs "
            f"(one per TP rank and per expert worker) but {given}"
        )
    opts = UpOptions(
        model=layout.model, pp=layout.pp, tp=layout.tp, ep=layout.ep, dp=layout.dp,
        expert_replicas=layout.expert_replicas, device=layout.device, gpus=gpus,
        deployment=layout.deployment, dtype=layout.dtype, kv_blocks=layout.kv_blocks,
        advertise=lambda worker_id, devices: advertise(layout, worker_id, devices),
    )
    topology = plan_topology(opts)
    check_bookings(workers(topology))
    return topology


def advertise(layout: Layout, worker_id: str, devices: list[str]) -> str:
    """``SERVICE:PORT`` (one host) or ``HOST:PORT`` (``--hosts``) of a worker on ``devices``; on
    Kubernetes its Service's name and ``WORKER_PORT``."""
    if layout.target == "k8s":  # a pod (and a Service) per worker: every one may take the same port
        return f"{K8S_PREFIX}{worker_id}:{WORKER_PORT}"
    places = {layout.locate(gpu_index(d)) for d in devices}
    hosts = {host for host, _ in places}
    if len(hosts) != 1:
        raise ValueError(
            f"{worker_id} would span hosts {sorted(hosts)}: its TP ranks share one host; "
            f"give each host a GPU count that fits whole stages"
        )
    host, local = min(places, key=lambda place: place[1])
    return f"{host or worker_id}:{WORKER_PORT + local}"


def gpu_index(device: str) -> int:
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise ValueError(f"device {device!r} is not cuda:N")
    return int(index)


def workers(topology: Topology) -> list[Worker]:
    """Every stage and expert worker of every chain, in chain order."""
    found = []
    for chain in topology.chains:
        c = chain.index
        for s in chain.stages:
            args = ("stage_worker", "--chain", str(c), "--stage", str(s.index))
            found.append(Worker(stage_worker_id(c, s.index), args, s.address, _gpus(s.devices)))
        for e in chain.expert_workers:
            args = ("expert_worker", "--chain", str(c), "--worker", str(e.index))
            found.append(Worker(expert_worker_id(c, e.index), args, e.address, _gpus([e.device])))
    return found


def _gpus(devices: Sequence[str]) -> tuple[int, ...]:
    return tuple(gpu_index(d) for d in devices if d != "cpu")  # a cpu layout books none


def check_bookings(found: list[Worker]) -> None:
    """ValueError when two workers (or two ranks of one) book the same GPU."""
    owner: dict[int, str] = {}
    for worker in found:
        for gpu in worker.gpus:
            if gpu in owner:
                raise ValueError(f"GPU {gpu} is booked twice: by {owner[gpu]} and by {worker.name}")
            owner[gpu] = worker.name


def in_container(topology: Topology) -> Topology:
    """``topology`` with every worker's devices as its container sees them (renumbered from 0)."""
    chains = tuple(
        replace(chain,
                stages=tuple(replace(s, devices=tuple(d if d == "cpu" else f"cuda:{r}" for r, d in enumerate(s.devices)))
                             for s in chain.stages),
                expert_workers=tuple(replace(e, device=e.device if e.device == "cpu" else "cuda:0")
                                     for e in chain.expert_workers))
        for chain in topology.chains
    )
    return replace(topology, chains=chains)
