"""Child processes that never outlive their parent (Linux ``PR_SET_PDEATHSIG``), and how long a
watched one may freeze before its watcher kills it (``LIVENESS_S``)."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1
LIVENESS_S = 10.0
"""How long a process that served may answer nothing (or a TP rank stay stopped) before whoever
watches it kills it to start it again: `stagemesh up --liveness-s` (``stagemesh.deploy.liveness``),
a stage's rank 0 for its ranks (``stage_worker.ranks``)."""


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies, however it dies.

    NOTE: the signal fires when the parent *thread* that forked the child ends, not only the
    process: spawn from a thread that lives as long as the process (the main thread).
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def follow_parent(parent_pid: int) -> None:
    """``die_with_parent`` called by the child itself, first thing: for parents that must not
    fork with a ``preexec_fn`` (a process running gRPC threads aborts in the forked child).
    Exits at once when the parent died before this call."""
    die_with_parent()
    if os.getppid() != parent_pid:
        raise SystemExit(f"parent process {parent_pid} is gone")


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal or a tracer (``T`` / ``t`` in ``/proc/PID/stat``)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # gone, or no /proc here
        return False
    return state in ("T", "t")
