"""Where a benchmark's CPU goes: each mesh process's user + system CPU seconds over the run,
read from ``/proc`` right before the first request and right after the last token, summed
per role and divided by the output tokens.

NOTE: ``/proc/PID/stat``'s ``utime`` and ``stime`` (fields 14 and 15, in clock ticks of
usually 10 ms) already sum every thread of the process. A process's own child processes (a
stage's tensor-parallel ranks) count with it: they are found by their ``ppid`` in
``/proc/*/stat``, without descending into another process of the mesh (the launcher's
children are the bench's own, so the bench client counts its own process only). A child
that exits inside the window takes its CPU with it and is not counted. A process that is
gone at either reading, or whose pid is unknown, has no figure (``cpu_s`` None): it is never
guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROLES = ("gateway", "frontends", "stages", "experts", "redis", "client")
"""The role groups of the report, in its order (a process of another name counts as ``other``)."""

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    """What the report needs of one ``/proc/PID/stat`` line."""

    pid: int
    ppid: int
    cpu_ticks: int
    """``utime + stime``: user and system CPU of all its threads, in clock ticks."""


@dataclass(frozen=True)
class MeshProcess:
    """One process whose CPU the report shows."""

    name: str
    """``gateway``, ``frontend-N``, ``stage-c{C}-s{S}``, ``expert-c{C}-e{W}``, ``redis``, ``client``."""
    pid: int | None
    """None when the bench cannot know it (a running mesh that does not say): reported as unknown."""
    with_children: bool = True
    """Count its child processes with it (False for the bench client, the parent of a mesh it brought up)."""

    @property
    def role(self) -> str:
        return role_of(self.name)


def role_of(name: str) -> str:
    """The role group of a process name: ``stage-c0-s1`` -> ``stages``, ``frontend-2`` -> ``frontends``."""
    for prefix, role in (("frontend", "frontends"), ("stage-", "stages"), ("expert-", "experts")):
        if name.startswith(prefix):
            return role
    return name if name in ROLES else "other"


def parse_stat(text: str) -> ProcStat:
    """One ``/proc/PID/stat`` line. The command name, in parentheses, may hold spaces and
    parentheses itself, so the fields are counted after its last ``)``."""
    head, _, tail = text.rpartition(")")
    fields = tail.split()  # fields[0] is field 3 (state): field n of `man 5 proc` is fields[n - 3]
    return ProcStat(pid=int(head.split("(", 1)[0]), ppid=int(fields[1]), cpu_ticks=int(fields[11]) + int(fields[12]))


def read_stats(proc: Path = PROC) -> dict[int, ProcStat]:
    """Every process's ``stat`` now, by pid (one that exits while it is read is left out)."""
    out = {}
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = parse_stat(Path(entry.path, "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    return out


def subtree(root: int, stats: dict[int, ProcStat], stop: set[int]) -> list[int]:
    """``root`` and its descendants in ``stats``, not descending into a pid of ``stop``."""
    children: dict[int, list[int]] = {}
    for s in stats.values():
        children.setdefault(s.ppid, []).append(s.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(c for c in children.get(pid, ()) if c not in stop)
    return sorted(out)


class CpuProbe:
    """Two readings of ``/proc``: ``start()`` before the first request, ``stop()`` after the last token."""

    def __init__(self, proc: Path = PROC):
        self.proc = proc
        self.before: dict[int, ProcStat] = {}
        self.after: dict[int, ProcStat] = {}

    def start(self) -> None:
        self.before = read_stats(self.proc)

    def stop(self) -> None:
        self.after = read_stats(self.proc)


def process_cpu(p: MeshProcess, before: dict[int, ProcStat], after: dict[int, ProcStat], stop: set[int],
                tick_s: float) -> dict:
    """One process's row: its pids (children included) and CPU seconds between the readings."""
    if p.pid is None or p.pid not in before or p.pid not in after:
        return {"name": p.name, "role": p.role, "pid": p.pid, "pids": [], "cpu_s": None}
    pids = subtree(p.pid, after, stop) if p.with_children else [p.pid]
    ticks = sum(after[q].cpu_ticks - (before[q].cpu_ticks if q in before else 0) for q in pids)
    return {"name": p.name, "role": p.role, "pid": p.pid, "pids": pids, "cpu_s": ticks * tick_s}


def role_sums(rows: list[dict], output_tokens: int, window_s: float) -> dict[str, dict]:
    """Per role (every one of ``ROLES``, and ``other`` when present) and ``total``: processes,
    how many of them have no figure, CPU seconds (None when none has one), µs per output
    token, and cores (CPU seconds / window)."""
    roles = list(ROLES) + (["other"] if any(r["role"] == "other" for r in rows) else [])
    groups = {role: [r for r in rows if r["role"] == role] for role in roles}
    groups["total"] = rows
    return {role: _sum(group, output_tokens, window_s) for role, group in groups.items()}


def _sum(rows: list[dict], output_tokens: int, window_s: float) -> dict:
    known = [r["cpu_s"] for r in rows if r["cpu_s"] is not None]
    cpu_s = sum(known, 0.0) if known or not rows else None
    return {
        "processes": len(rows),
        "unknown": len(rows) - len(known),
        "cpu_s": cpu_s,
        "us_per_token": None if cpu_s is None else cpu_s / output_tokens * 1e6,
        "cores": None if cpu_s is None else cpu_s / window_s,
    }


def cpu_figures(procs: list[MeshProcess], probe: CpuProbe, output_tokens: int, window_s: float,
                tick_s: float | None = None) -> dict:
    """The ``systems.mesh.cpu`` document: ``processes`` (one row each) and ``roles`` (sums)."""
    tick_s = tick_s or 1.0 / os.sysconf("SC_CLK_TCK")
    stop = {p.pid for p in procs if p.pid is not None}
    rows = [process_cpu(p, probe.before, probe.after, stop, tick_s) for p in procs]
    return {"window_s": window_s, "tick_s": tick_s, "processes": rows, "roles": role_sums(rows, output_tokens, window_s)}
