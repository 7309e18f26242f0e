"""The dashboard's live pipeline timeline, served as JSON on ``GET /api/timeline``: per chain,
each stage's last steps on one time axis (the clock-cycle picture of pipeline parallelism, the
bubbles being the gaps), and the tokens each expert ran as heat rows.

Where the times come from: each stage measures every step it runs with its own wall clock
(``time.time()`` around the step, in ``stage_worker.pipeline``) and publishes the last 256 as
``busy_intervals``, with their step ids (``busy_steps``), in its heartbeat figures (every
second). The gateway adds no timing of its own.

NOTE: one clock. The rows of a chain are only comparable if its stages' clocks agree. Processes
of one host share the clock (``stagemesh up`` puts a whole mesh on one host); across hosts the
timeline assumes clocks synchronised by NTP or PTP, and an offset between two hosts shows as
one row shifted against the others (at NTP's usual millisecond, small against a step of a large
model, not against a toy one's).

The window ends at the oldest of the chain's last heartbeats, so every row is complete up to
its right edge (a row whose figures are a second older would otherwise show a false bubble
there); it starts ``window_s`` before, or later when a busy stage's 256 kept steps do not reach
that far back. A chain that ran no step in that window shows its last steps instead, marked
``idle`` with their age.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.history import History
from gateway.stage_stats import FULL_INTERVALS, bubble_fractions
from stagemesh.errors import StagemeshError
from stagemesh.mesh.figures import StageFigures
from stagemesh.mesh.store import Store, WorkerInfo

TIMELINE_S = 1.0
MAX_TIMELINE_S = 30.0


async def read_timeline(store: Store, history: History | None, window_s: float = TIMELINE_S) -> dict[str, Any]:
    """The ``/api/timeline`` document from the workers' figures in Redis now."""
    try:
        workers, metrics = await asyncio.gather(store.list_workers(), store.get_metrics())
    except StagemeshError as err:
        return {"window_s": window_s, "chains": [], "experts": [], "error": f"figures unavailable: {err.message}"}
    recent = history.expert_recent if history is not None else {}
    return build_timeline(workers, metrics, time.time(), recent, window_s)


def build_timeline(workers: list[WorkerInfo], metrics: dict[str, dict[str, Any]], now: float,
                   expert_recent: dict[int, dict[str, int]] | None = None,
                   window_s: float = TIMELINE_S) -> dict[str, Any]:
    """Per chain its stages' steps in one window (times in seconds from the window's start, each
    step ``[t0, t1, step id]``), and the expert heat rows."""
    stages: dict[int, list[tuple[WorkerInfo, StageFigures]]] = {}
    for info in workers:
        if info.role == "stage" and info.chain is not None and info.stage is not None:
            stages.setdefault(info.chain, []).append((info, StageFigures.from_json(metrics.get(info.worker_id, {}))))
    return {
        "window_s": window_s,
        "now": now,
        "chains": [chain_timeline(chain, sorted(pairs, key=lambda p: p[0].stage), now, window_s)
                   for chain, pairs in sorted(stages.items())],
        "experts": expert_rows(workers, metrics, expert_recent or {}),
    }


def chain_timeline(chain: int, stages: list[tuple[WorkerInfo, StageFigures]], now: float,
                   window_s: float) -> dict[str, Any]:
    live = [figs for _, figs in stages if figs.time is not None]
    end = min((figs.time for figs in live), default=now)
    steps = {info.worker_id: list(zip(figs.intervals, figs.interval_steps)) for info, figs in stages}
    idle = not any(end - window_s < t1 <= end for rows in steps.values() for (t0, t1), _ in rows)
    if idle:
        end = max((t1 for rows in steps.values() for (_, t1), _ in rows), default=end)
    start = end - window_s
    for rows in steps.values():
        if len(rows) >= FULL_INTERVALS:
            start = max(start, min(end, rows[0][0][0]))
    bubbles = bubble_fractions({wid: [pair for pair, _ in rows] for wid, rows in steps.items()}, end,
                               window_s=end - start)
    return {
        "chain": chain,
        "start": start,
        "end": end,
        "idle": idle,
        "age_s": round(max(0.0, now - end), 3),
        "stages": [{
            "stage": info.stage,
            "name": f"c{info.chain}-s{info.stage}",
            "up": figs.time is not None,
            "bubble_fraction": round(bubbles.get(info.worker_id, 0.0), 4),
            "steps": [[round(max(t0, start) - start, 6), round(min(t1, end) - start, 6), step]
                      for (t0, t1), step in steps[info.worker_id] if t1 > start and t0 < end],
        } for info, figs in stages],
    }


def expert_rows(workers: list[WorkerInfo], metrics: dict[str, dict[str, Any]],
                recent: dict[int, dict[str, int]]) -> list[dict[str, Any]]:
    """One heat row per (chain, MoE layer): the rows each expert ran over the last samples
    (``"window": "recent"``), or since its worker started while none ran lately (``"total"``)."""
    totals: dict[int, dict[str, int]] = {}
    held: dict[tuple[int, int], set[int]] = {}
    for info in workers:
        if info.role != "expert":
            continue
        chain = -1 if info.chain is None else info.chain
        for layer, ids in info.experts.items():
            held.setdefault((chain, int(layer)), set()).update(int(i) for i in ids)
        for key, rows in (metrics.get(info.worker_id, {}).get("expert_tokens") or {}).items():
            if isinstance(rows, (int, float)):
                totals.setdefault(chain, {})[key] = totals.get(chain, {}).get(key, 0) + int(rows)
    for chain, counts in totals.items():
        for layer, expert in filter(None, map(_layer_expert, counts)):
            held.setdefault((chain, layer), set()).add(expert)
    rows = []
    for (chain, layer), experts in sorted(held.items()):
        ids = sorted(experts)
        lately = [recent.get(chain, {}).get(f"{layer}:{e}", 0) for e in ids]
        window = "recent" if any(lately) else "total"
        counts = lately if any(lately) else [totals.get(chain, {}).get(f"{layer}:{e}", 0) for e in ids]
        rows.append({"chain": chain, "layer": layer, "experts": ids, "tokens": counts, "window": window})
    return rows


def _layer_expert(key: str) -> tuple[int, int] | None:
    """``"<layer>:<expert>"`` as numbers; None for a key of another shape."""
    layer, _, expert = key.partition(":")
    return (int(layer), int(expert)) if layer.isdigit() and expert.isdigit() else None
