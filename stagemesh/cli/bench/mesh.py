"""The mesh side of a benchmark: bring a mesh up (or use one), drive it through the SDK, and
read each stage's busy time from Redis.

NOTE: busy fraction and bubble. Every stage worker records the wall-clock ``[t0, t1]`` of
each step it runs (the last 256, ``busy_intervals``) and its running ``busy_s`` total, and
publishes them to Redis with its heartbeat. A stage's busy fraction over the run is the time
its intervals cover inside the run window ``[first request sent, last token received]``,
divided by the window. When the stage ran more steps in the window than the 256 intervals
kept, the fraction falls back to the ``busy_s`` growth over the window (``source``
says which). The pipeline bubble is ``1 - mean(busy fraction over the stages)``: the share of
stage-time the pipeline left idle.

NOTE: per-step overhead. The mesh's step interval is the run window divided by the steps
the first stage of the chain ran in it; a stage's compute time per step is its busy time
divided by its steps. Their difference, per stage, is what each step costs beyond that
stage's own compute: the gateway's scheduling, the hops to and from the stage, the wait for
the other stages (and, at the start and end of the window, the ramp-up and drain).

Where the CPU goes is read from ``/proc`` (``cpu``): the pids come from the launcher for a
mesh brought up here, from the status document for a running one (``--addr``).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from stagemesh.cli.bench.cpu import CpuProbe, MeshProcess, cpu_figures
from stagemesh.cli.bench.workload import BenchRequest, LoadShape, SystemRun, Trace, arrival_offsets
from stagemesh.cli.connect import DEFAULT, Connect
from stagemesh.client import AsyncClient
from stagemesh.mesh.figures import StageFigures
from stagemesh.mesh.store import Store
from stagemesh.runtime.net import free_port

HEARTBEAT_WAIT_S = 1.5
"""Longer than a worker's heartbeat interval (1 s): after it, Redis holds figures newer than the run."""


@contextmanager
def mesh_up(
    model: Path, *, pp: int, tp: int, device: str, log_dir: Path | None, dp: int = 1, overlap: bool = True,
    micro_batches: int | None = None, cpu_bind: bool = True, insecure: bool = False,
) -> Iterator[tuple[str, str, list[MeshProcess]]]:
    """Starts a whole mesh on this machine; yields (gateway address, Redis URL, its processes
    and the bench client's); stops it after."""
    from stagemesh.deploy.launch import Mesh
    from stagemesh.deploy.up_plan import UpOptions

    opts = UpOptions(
        model=model, pp=pp, tp=tp, dp=dp, device=device, port=free_port(), log_dir=log_dir, overlap=overlap, cpu_bind=cpu_bind,
        micro_batches=micro_batches, insecure=insecure,
    )
    mesh = Mesh(opts)
    failed = True
    try:
        mesh.start()
        mesh.wait_ready()
        procs = [MeshProcess(name, proc.pid) for name, proc in mesh.procs.items()]
        redis = [MeshProcess("redis", mesh.redis.pid)] if mesh.redis is not None else []
        yield mesh.gateway_address, mesh.redis_url, procs + redis + [CLIENT]
        failed = False
    finally:
        mesh.stop(keep_logs=failed)  # a temporary log dir goes, unless its logs say why the run failed


async def drive(addr: str, requests: list[BenchRequest], shape: LoadShape, progress, probe: CpuProbe,
                connect: Connect = DEFAULT) -> list[Trace]:
    """Sends every request (paced by ``shape``) and records when each token arrives; ``probe``
    reads the CPU figures right before the first request and right after the last token."""
    limit = asyncio.Semaphore(shape.concurrency or len(requests))
    offsets = arrival_offsets(shape)
    async with connect.client(addr) as client:
        probe.start()
        start = time.time()
        jobs = [_one(client, r, start + off, limit, progress) for r, off in zip(requests, offsets)]
        traces = list(await asyncio.gather(*jobs))
        probe.stop()
        return traces


async def _one(client: AsyncClient, req: BenchRequest, at: float, limit: asyncio.Semaphore, progress) -> Trace:
    await asyncio.sleep(max(0.0, at - time.time()))
    async with limit:
        trace = Trace(sent=time.time())
        stream = client.stream(token_ids=list(req.token_ids), max_new_tokens=req.output_len, ignore_eos=True)
        async for tok in stream:
            if tok.token_id is not None:
                trace.token_times.append(time.time())
                trace.token_ids.append(tok.token_id)
                progress.update(1)
    return trace


async def warm_up(addr: str, requests: list[BenchRequest], connect: Connect = DEFAULT) -> None:
    """A few short requests first, so one-time costs (connections, allocators) stay out of the run."""
    async with connect.client(addr) as client:
        await asyncio.gather(*(client.generate(token_ids=list(r.token_ids), max_new_tokens=2, ignore_eos=True) for r in requests[:4]))


def run_mesh(name: str, addr: str, redis_url: str | None, requests: list[BenchRequest], shape: LoadShape, bar,
             procs: list[MeshProcess] | None = None, connect: Connect = DEFAULT) -> SystemRun:
    """The whole load through the mesh at ``addr`` (reached as ``connect`` says); stage figures when
    its Redis is known; the CPU of ``procs`` (None: the processes its status document lists)."""
    asyncio.run(warm_up(addr, requests, connect))
    if procs is None:
        procs = status_processes(asyncio.run(_status(addr, connect)), local=is_local(addr))
    before = _stage_metrics(redis_url, wait=True)
    probe = CpuProbe()
    with bar() as progress:
        traces = asyncio.run(drive(addr, requests, shape, progress, probe, connect))
    t0 = min(t.sent for t in traces)
    t1 = max(t.token_times[-1] for t in traces if t.token_times)
    after = _stage_metrics(redis_url, wait=True)
    stages = stage_figures(before, after, t0, t1) if redis_url else None
    steps = max((s["steps"] for s in stages), default=None) if stages else None
    output_tokens = sum(len(t.token_ids) for t in traces)
    return SystemRun(
        name=name,
        wall_s=t1 - t0,
        output_tokens=output_tokens,
        token_ids=[t.token_ids for t in traces],
        steps=steps,
        traces=traces,
        stages=stages,
        cpu=cpu_figures(procs, probe, output_tokens, t1 - t0),
        note=None if redis_url else "per-stage figures need the mesh's Redis (--redis-url with --addr)",
    )


CLIENT = MeshProcess("client", os.getpid(), with_children=False)
"""The bench client: this process alone (a mesh it brought up is its children)."""


async def _status(addr: str, connect: Connect) -> dict:
    async with connect.client(addr) as client:
        return await client.status()


MODULES = {"gateway": "gateway", "frontends": "frontend", "stages": "stage_worker", "experts": "expert_worker"}
"""The module (``python -m MODULE``) each role of the status document runs."""


def runs_module(pid: int, module: str) -> bool:
    """Whether process ``pid`` of this machine is ``python -m module``."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # gone, or no /proc here
        return False
    return any(a == b"-m" and b == module.encode() for a, b in zip(args, args[1:]))


def status_processes(status: dict, *, local: bool, runs: Callable[[int, str], bool] = runs_module) -> list[MeshProcess]:
    """A running mesh's processes as its status document lists them (the gateway, the frontends
    attached to it, the workers), and the bench client. A pid only where the document gives
    it, Redis's never; no pid at all when the mesh runs on another machine (``local`` False),
    nor where that pid here does not ``runs`` the role's module (a container's pids are its own
    namespace's: pid 7 in a compose gateway's container is another process, or none, here):
    unknown, never guessed."""
    gateway = status.get("gateway", {})
    procs = [MeshProcess("gateway", gateway.get("pid")), MeshProcess("redis", None)]
    procs += [MeshProcess(_frontend_name(f["name"]), f.get("pid") or None) for f in gateway.get("frontends", [])]
    for w in status.get("workers", []):
        name = f"stage-c{w['chain']}-s{w['stage']}" if w["role"] == "stage" else f"{w['role']}-{w['address']}"
        procs.append(MeshProcess(name, w.get("pid") or None))
    procs = [p if local and p.pid is not None and runs(p.pid, MODULES[p.role]) else MeshProcess(p.name, None)
             for p in procs]
    return procs + [CLIENT]


def _frontend_name(name: str) -> str:
    """A frontend's process name (its role is read from the prefix): ``frontend-0`` as `up`
    names them, ``frontend-web-1`` for one named ``web-1`` (compose, Kubernetes)."""
    return name if name.startswith("frontend") else f"frontend-{name}"


def is_local(addr: str) -> bool:
    """Whether ``host:port`` names this machine (a loopback or this host's name)."""
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in {"localhost", "0.0.0.0", "::", "::1", socket.gethostname()}


def _stage_metrics(redis_url: str | None, *, wait: bool) -> dict[str, dict]:
    if redis_url is None:
        return {}
    if wait:
        time.sleep(HEARTBEAT_WAIT_S)
    return asyncio.run(_read_metrics(redis_url))


async def _read_metrics(redis_url: str) -> dict[str, dict]:
    store = await Store.connect(redis_url)
    try:
        metrics = await store.get_metrics()
    finally:
        await store.close()
    return {wid: m for wid, m in metrics.items() if wid.startswith("stage-")}


def stage_figures(before: dict[str, dict], after: dict[str, dict], t0: float, t1: float) -> list[dict]:
    """Each stage's busy fraction over ``[t0, t1]`` (see the module NOTE), in stage order."""
    window = max(t1 - t0, 1e-9)
    out = []
    for wid in sorted(after, key=_natural):
        now, then = StageFigures.from_json(after[wid]), StageFigures.from_json(before.get(wid, {}))
        steps = (now.steps or 0) - (then.steps or 0)
        inside = [(max(a, t0), min(b, t1)) for a, b in now.intervals if b > t0 and a < t1]
        if steps <= len(inside):
            busy, source = sum(b - a for a, b in inside), "busy_intervals"
        else:
            busy, source = (now.busy_s or 0.0) - (then.busy_s or 0.0), "busy_s"
        out.append({"worker": wid, "steps": steps, "busy_s": busy, "busy_fraction": min(1.0, busy / window), "source": source})
    first: dict[str, int] = {}
    for s in out:  # in natural order: each chain's first stage comes first
        first.setdefault(_chain(s["worker"]), s["steps"])
    return [{**s, **step_overhead(s, first.get(_chain(s["worker"])), window)} for s in out]


def step_overhead(stage: dict, first_steps: int | None, window_s: float) -> dict:
    """The mesh's step interval (the window over the chain's first stage's steps), the stage's
    compute time per step (busy time over its steps) and their difference, in ms; None
    where there were no steps."""
    interval = window_s / first_steps * 1e3 if first_steps else None
    compute = stage["busy_s"] / stage["steps"] * 1e3 if stage["steps"] else None
    overhead = interval - compute if interval is not None and compute is not None else None
    return {"step_interval_ms": interval, "compute_ms": compute, "overhead_ms": overhead}


def _chain(worker_id: str) -> str:
    """``stage-c1-s2`` -> ``c1``."""
    return worker_id.split("-")[1]


def _natural(worker_id: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", worker_id)]
