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
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stagemesh.cli.bench.workload import BenchRequest, LoadShape, SystemRun, Trace, arrival_offsets
from stagemesh.client import AsyncClient
from stagemesh.mesh.figures import StageFigures
from stagemesh.mesh.store import Store
from stagemesh.runtime.net import free_port

HEARTBEAT_WAIT_S = 1.5
"""Longer than a worker's heartbeat interval (1 s): after it, Redis holds figures newer than the run."""


@contextmanager
def mesh_up(
    model: Path, *, pp: int, tp: int, device: str, log_dir: Path | None, dp: int = 1, overlap: bool = True,
    cpu_bind: bool = True,
) -> Iterator[tuple[str, str]]:
    """Starts a whole mesh on this machine; yields (gateway address, Redis URL); stops it after."""
    from stagemesh.deploy.launch import Mesh, UpOptions

    opts = UpOptions(
        model=model, pp=pp, tp=tp, dp=dp, device=device, port=free_port(), log_dir=log_dir, overlap=overlap, cpu_bind=cpu_bind
    )
    mesh = Mesh(opts)
    try:
        mesh.start()
        mesh.wait_ready()
        yield mesh.gateway_address, mesh.redis_url
    finally:
        mesh.stop()


async def drive(addr: str, requests: list[BenchRequest], shape: LoadShape, progress) -> list[Trace]:
    """Sends every request (paced by ``shape``) and records when each token arrives."""
    limit = asyncio.Semaphore(shape.concurrency or len(requests))
    offsets = arrival_offsets(shape)
    async with AsyncClient(addr) as client:
        start = time.time()
        jobs = [_one(client, r, start + off, limit, progress) for r, off in zip(requests, offsets)]
        return list(await asyncio.gather(*jobs))


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


async def warm_up(addr: str, requests: list[BenchRequest]) -> None:
    """A few short requests first, so one-time costs (connections, allocators) stay out of the run."""
    async with AsyncClient(addr) as client:
        await asyncio.gather(*(client.generate(token_ids=list(r.token_ids), max_new_tokens=2, ignore_eos=True) for r in requests[:4]))


def run_mesh(name: str, addr: str, redis_url: str | None, requests: list[BenchRequest], shape: LoadShape, bar) -> SystemRun:
    """The whole load through the mesh at ``addr``; stage figures when its Redis is known."""
    asyncio.run(warm_up(addr, requests))
    before = _stage_metrics(redis_url, wait=True)
    with bar() as progress:
        traces = asyncio.run(drive(addr, requests, shape, progress))
    t0 = min(t.sent for t in traces)
    t1 = max(t.token_times[-1] for t in traces if t.token_times)
    after = _stage_metrics(redis_url, wait=True)
    stages = stage_figures(before, after, t0, t1) if redis_url else None
    steps = max((s["steps"] for s in stages), default=None) if stages else None
    return SystemRun(
        name=name,
        wall_s=t1 - t0,
        output_tokens=sum(len(t.token_ids) for t in traces),
        token_ids=[t.token_ids for t in traces],
        steps=steps,
        traces=traces,
        stages=stages,
        note=None if redis_url else "per-stage figures need the mesh's Redis (--redis-url with --addr)",
    )


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
    return out


def _natural(worker_id: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", worker_id)]
