"""The dashboard page as the server renders it: the mesh's current values already in the HTML
(the first paint shows the mesh, with no script run yet), and the status, history and timeline
documents embedded for the page's script, which draws the charts at once and then polls.

The template is ``gateway/templates/dashboard.html`` (jinja2, autoescaped). Its tables are the
same as those ``gateway/static/dashboard.js`` redraws every second: a column changed in one is
changed in the other (the integration test reads both).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jinja2

from stagemesh.config import layer_range

TEMPLATES = Path(__file__).resolve().parent / "templates"
STALE_S = 5.0
"""As ``STALE_S`` in dashboard.js: a worker whose last heartbeat is older shows DOWN."""

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True)


def render_page(status: dict[str, Any], history: dict[str, Any], timeline: dict[str, Any],
                poll_ms: int = 1000) -> str:
    """The whole page for the documents of ``/api/status``, ``/api/history`` and ``/api/timeline``."""
    return _env.get_template("dashboard.html").render(
        doc=status,
        ready=bool(status.get("gateway", {}).get("ready")),
        chains=[chain_row(status, chain) for chain in status.get("chains", [])],
        groups=worker_groups(status),
        updated=time.strftime("%H:%M:%S"),
        initial={"status": status, "history": history, "timeline": timeline},
        poll_ms=poll_ms,
    )


def chain_row(doc: dict[str, Any], chain: dict[str, Any]) -> dict[str, Any]:
    """One row of the chains table (as ``chainRow`` in dashboard.js)."""
    stages = [w for w in doc.get("workers", []) if w["role"] == "stage" and w["chain"] == chain["id"]]
    sched = next((c for c in doc.get("gateway", {}).get("chains", []) if c["id"] == chain["id"]), {})
    last = max(stages, key=lambda w: w["stage"], default=None)
    bubble = sum(w["load"].get("bubble_fraction", 0) for w in stages) / len(stages) if stages else None
    healthy = bool(chain["healthy"]) and all(is_up(w) for w in stages)
    return {
        "id": chain["id"], "healthy": healthy,
        "cells": [chain["num_stages"], chain["requests_served"], chain["requests_running"],
                  chain["requests_waiting"],
                  f"{sched.get('kv_blocks_reserved', '–')} / {sched.get('kv_blocks_total', '–')}",
                  sched.get("steps_in_flight", "–"), num(last["load"].get("tokens_per_s")) if last else "–",
                  pct(bubble)],
    }


def worker_groups(doc: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Workers grouped by chain (stages in order, then its expert workers), shared ones last."""
    def key(w):
        return (math.inf if w["chain"] < 0 else w["chain"], 0 if w["role"] == "stage" else 1, w["stage"], w["address"])

    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for worker in sorted(doc.get("workers", []), key=key):
        title = f"chain {worker['chain']}" if worker["chain"] >= 0 else "shared"
        if not groups or groups[-1][0] != title:
            groups.append((title, []))
        groups[-1][1].append(worker_row(worker))
    return groups


def worker_row(worker: dict[str, Any]) -> dict[str, Any]:
    """One row of the workers table (as ``workerRow`` in dashboard.js)."""
    load = worker.get("load", {})
    kv_total = load.get("kv_blocks_total") or 0
    return {
        "up": is_up(worker), "address": worker["address"], "role": worker["role"], "name": worker_name(worker),
        "device": worker.get("device") or "–", "holdings": holdings(worker), "tp": worker.get("tp_size") or 1,
        "heartbeat": f"{worker.get('heartbeat_age_s', 0):.1f} s ago",
        "step": f"{ms(load.get('step_latency_p50_s'))} / {ms(load.get('step_latency_p99_s'))}",
        "mbps": num(load.get("micro_batches_per_s")), "tokens": num(load.get("tokens_per_s")),
        "queue": load.get("queue_depth", "–"),
        "kv": (load.get("kv_blocks_used", 0) / kv_total if kv_total else 0.0,
               f"{load.get('kv_blocks_used', '–')} / {load.get('kv_blocks_total', '–')}"),
        "busy": (load.get("busy_fraction") or 0.0, pct(load.get("busy_fraction"))),
        "bubble": pct(load.get("bubble_fraction")) if worker["role"] == "stage" else "–",
        "sent": size(load.get("bytes_sent")),
        "expert_tokens": load.get("expert_tokens") or {},
    }


def is_up(worker: dict[str, Any]) -> bool:
    return bool(worker.get("healthy")) and not worker.get("heartbeat_age_s", 0) > STALE_S


def worker_name(worker: dict[str, Any]) -> str:
    if worker["role"] == "stage":
        return f"stage c{worker['chain']}-s{worker['stage']}"
    return worker.get("id", "expert").replace("-", " ", 1)  # expert-c0-e1 -> "expert c0-e1"


def holdings(worker: dict[str, Any]) -> str:
    """Layers as ``stagemesh status`` writes them (``layer_range``: half-open, x.5 cuts layer x
    between its attention and its MLP), or the experts held."""
    if worker["role"] != "expert":
        return f"layers {layer_range(*(worker.get('layers') or (0, 0)))}"
    experts = worker.get("experts") or {}
    return "experts " + " · ".join(f"L{layer}: {' '.join(map(str, ids))}" for layer, ids in experts.items())


def num(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "–"


def pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, (int, float)) else "–"


def ms(s: Any) -> str:
    return f"{1000 * s:.{2 if s < 0.01 else 1}f} ms" if isinstance(s, (int, float)) and s > 0 else "–"


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.{1 if i else 0}f} {units[i]}"
