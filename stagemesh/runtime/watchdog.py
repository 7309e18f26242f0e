"""A serving process that stops running its event loop for ``--liveness-s`` ends itself, so that
whatever runs it starts it again: `stagemesh up`, compose's ``restart: unless-stopped``, Kubernetes.

Why the process itself: `stagemesh up` kills a child that answers no health check for that long
(``stagemesh.deploy.liveness``), but compose restarts only a container that exits, never one whose
health check fails, so a gateway or frontend whose loop is stuck (a deadlock, a call that never
returns) held its clients' streams for as long as it stayed stuck.

``LoopWatchdog`` re-arms ``faulthandler.dump_traceback_later`` from the loop every
``min(0.5, limit/4)`` s. faulthandler's timer is a C thread that needs no GIL: when the loop did
not re-arm it in time, even with the GIL held by a stuck C call, it writes every thread's stack to
stderr (the process's log: what was stuck) and calls ``_exit(1)``. A process stopped by a signal
(SIGSTOP, a frozen cgroup) runs nothing, this timer included: `stagemesh up`'s health checks kill
it (``stagemesh.deploy.liveness``); once continued, its loop re-arms the timer as it catches up.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import sys

from stagemesh.runtime.procs import LIVENESS_S


def seconds(text: str) -> float:
    """``--liveness-s``'s value: 0 or more seconds (argparse's error otherwise, before anything starts)."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: give how long the event loop may stand still, or 0: never")
    return value


def add_liveness_arg(parser: argparse.ArgumentParser, also: str = "") -> None:
    """``--liveness-s``, the same for every serving process (``also``: what else it bounds there)."""
    parser.add_argument("--liveness-s", type=seconds, default=LIVENESS_S, metavar="S",
                        help="once serving, exit (every thread's stack in the log) when the event loop has not "
                             f"run for S seconds, so that `up`, compose or Kubernetes restarts it{also}; 0: never")


class LoopWatchdog:
    """Ends the process when the running loop has not run for ``limit_s`` (module docstring); 0: off."""

    def __init__(self, limit_s: float):
        if limit_s < 0:
            raise ValueError(f"--liveness-s {limit_s:g}: give how long the event loop may stand still, or 0: never")
        self.limit_s = limit_s
        self.every_s = min(0.5, limit_s / 4)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Arm it on the running loop (nothing when off)."""
        if self.limit_s:
            self._tick()

    def _tick(self) -> None:
        faulthandler.dump_traceback_later(self.limit_s, exit=True, file=sys.stderr)
        self._handle = asyncio.get_running_loop().call_later(self.every_s, self._tick)

    def stop(self) -> None:
        """Disarm it (before a drain, whose length is the grace's, not the loop's)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            faulthandler.cancel_dump_traceback_later()
