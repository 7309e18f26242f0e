"""The client side of `stagemesh generate --addr` and `stagemesh status --addr` (torch-free)."""

from __future__ import annotations

import asyncio
import dataclasses

from stagemesh.cli.connect import DEFAULT, Connect
from stagemesh.cli.requests_io import InputLine, Outcome
from stagemesh.client import AsyncClient
from stagemesh.config import layer_range
from stagemesh.errors import StagemeshError
from stagemesh.mesh.figures import WorkerLoad


async def run_remote(addr: str, lines: list[InputLine], connect: Connect = DEFAULT) -> list[Outcome]:
    """Every line at once through the gateway at ``addr``; outcomes in input order."""
    async with connect.client(addr) as client:
        return list(await asyncio.gather(*(_one(client, line) for line in lines)))


async def _one(client: AsyncClient, line: InputLine) -> Outcome:
    try:
        result = await client.generate(line.prompt, line.token_ids, **dataclasses.asdict(line.params))
    except StagemeshError as e:
        return Outcome([], error=e)
    text = result.text if line.prompt is not None or result.text else None
    logprobs = None if result.logprobs is None else list(result.logprobs)
    return Outcome(list(result.token_ids), text=text, finish_reason=result.finish_reason, logprobs=logprobs)


async def fetch_status(addr: str, connect: Connect = DEFAULT) -> dict:
    """The status document of the gateway at ``addr``."""
    async with connect.client(addr) as client:
        return await client.status()


def format_status(doc: dict) -> str:
    """A readable table of chains and workers."""
    out = [f"model {doc.get('model') or '?'}  (stagemesh {doc.get('version') or '?'})", ""]
    out += _table(
        ("CHAIN", "HEALTHY", "STAGES", "SERVED", "RUNNING", "WAITING"),
        [(c["id"], _yes(c["healthy"]), c["num_stages"], c["requests_served"], c["requests_running"], c["requests_waiting"])
         for c in doc.get("chains", ())],
    )
    out.append("")
    out += _table(
        ("ROLE", "CHAIN", "STAGE", "LAYERS", "ADDRESS", "DEVICE", "TP", "PID", "HEALTHY", "QUEUE", "KV USED", "BUSY"),
        [(w["role"], _id(w["chain"]), _id(w["stage"]), _layers(w), w["address"], w["device"],
          w.get("tp_size") or 1, w["pid"], _yes(w["healthy"]), *_load_cells(WorkerLoad(**w["load"])))
         for w in doc.get("workers", ())],
    )
    gateway = doc.get("gateway") or {}
    if (frontends := gateway.get("frontends")) is not None:
        out += ["", "frontends: " + (", ".join(map(_frontend, frontends)) or "none attached")]
    if alert := gateway.get("alert"):  # a forged document refused lately (docs/security.md)
        out += ["", f"DEGRADED: {alert}"]
    return "\n".join(out)


def _frontend(f: dict) -> str:
    """``frontend-0 (pid 41, 3 open, 120 taken)``, ``frontend-1 (pid 42, spare)``; a gateway before
    ``taken`` gives no count."""
    if f.get("spare"):
        return f"{f['name']} (pid {f['pid'] or '?'}, spare)"
    taken = f", {f['taken']} taken" if "taken" in f else ""
    return f"{f['name']} (pid {f['pid'] or '?'}, {f['requests']} open{taken})"


def _layers(worker: dict) -> str:
    """A stage's layers as everywhere else (``layer_range``); "-" for a worker that holds none."""
    return layer_range(*worker["layers"]) if worker["role"] == "stage" else "-"


def _load_cells(load: WorkerLoad) -> tuple[str, ...]:
    """The QUEUE, KV USED and BUSY cells."""
    return str(load.queue_depth), f"{load.kv_blocks_used}/{load.kv_blocks_total}", f"{load.busy_fraction:.0%}"


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    cells = [header, *[tuple(str(v) for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return lines if rows else [*lines, "(none)"]


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _id(n: int) -> str:
    return "-" if n < 0 else str(n)
