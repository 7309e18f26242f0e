"""The processes of TP ranks 1..T-1 of a stage, as rank 0 starts and watches them.

Each is ``python -m stage_worker.tp_rank``; it dies with rank 0 (it sets PR_SET_PDEATHSIG
itself, ``stagemesh.runtime.procs.follow_parent``), and rank 0 polls it so that a rank that dies
turns the stage unhealthy within a poll or two.

NOTE: a rank that is stopped (SIGSTOP; ``T`` in ``/proc/PID/stat``) holds every collective of
the stage, while rank 0 still answers its health checks: no liveness probe sees it, and on dp=1
the chain's requests would fail once their failover wait ends. Rank 0 SIGKILLs a rank that has
been stopped for ``stopped_limit_s`` (the worker's ``--liveness-s``), and the stage goes down as
for any rank's death, to be restarted whole. A rank stuck while running (a deadlocked driver)
cannot be told from a slow one here: its stage is fenced by the gateway's step deadline.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from stage_worker.build import StageOptions
from stage_worker.topology import StagePlace, place_to_dict
from stagemesh.runtime.procs import stopped

log = logging.getLogger(__name__)

LOOK_EVERY_S = 0.1
"""How often rank 0 reads its ranks' state for a stopped one."""


def rank_command(place: StagePlace, opts: StageOptions, rank: int, init_method: str) -> list[str]:
    """The command line of TP rank ``rank`` (> 0) of the stage at ``place``."""
    return [
        sys.executable, "-m", "stage_worker.tp_rank",
        "--rank", str(rank),
        "--parent-pid", str(os.getpid()),
        "--init-method", init_method,
        "--place", json.dumps(place_to_dict(place)),
        "--options", json.dumps(opts.to_dict()),
    ]  # fmt: skip


class RankProcesses:
    """Ranks 1..T-1 of one stage: started from the main thread, polled, stopped or killed."""

    def __init__(self, commands: list[list[str]], stopped_limit_s: float = 0.0):
        # NOTE: no preexec_fn: Python code run in a child forked from a process with gRPC threads
        # aborts. Started from the main thread, which lives as long as the process: PDEATHSIG
        # (set by the child) fires when the creating *thread* ends.
        self.procs = {
            rank: subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            for rank, cmd in enumerate(commands, start=1)
        }
        self.stopping = False
        """Set before a deliberate stop, so that ranks ending on request do not read as died."""
        self.stopped_limit_s = stopped_limit_s
        """Kill a rank stopped (SIGSTOP) this long; 0: never."""
        self._stopped_since: dict[int, float] = {}
        self._next_look = 0.0
        """``first_dead`` runs before every step: ``/proc`` is read at most every ``LOOK_EVERY_S``."""
        for rank, proc in self.procs.items():
            log.info("started tp rank %d (pid %d)", rank, proc.pid)

    @property
    def pids(self) -> dict[int, int]:
        return {rank: proc.pid for rank, proc in self.procs.items()}

    def first_dead(self) -> tuple[int, int] | None:
        """(rank, exit code) of a rank process that has ended unasked, or None."""
        if self.stopping:
            return None
        look = bool(self.stopped_limit_s) and time.monotonic() >= self._next_look
        if look:
            self._next_look = time.monotonic() + LOOK_EVERY_S
        for rank, proc in self.procs.items():
            if look and proc.poll() is None:
                self._kill_if_stopped(rank, proc)
            if proc.poll() is not None:
                return rank, proc.returncode
        return None

    def _kill_if_stopped(self, rank: int, proc: subprocess.Popen) -> None:
        now = time.monotonic()
        if not stopped(proc.pid):
            self._stopped_since.pop(rank, None)
            return
        since = self._stopped_since.setdefault(rank, now)
        if now - since >= self.stopped_limit_s:
            log.error("tp rank %d (pid %d) has been stopped (SIGSTOP) for %.1f s: killing it; the stage goes down "
                      "to be restarted (--liveness-s %g)", rank, proc.pid, now - since, self.stopped_limit_s)
            proc.kill()
            proc.wait()

    def wait_dead(self, timeout_s: float) -> tuple[int, int] | None:
        """``first_dead``, waiting up to ``timeout_s`` for one to show."""
        deadline = time.monotonic() + timeout_s
        while (dead := self.first_dead()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return dead

    def stop(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the ranks to end (told to by a STOP broadcast), then kill them."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        for rank, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tp rank %d (pid %d) did not stop; killing it", rank, proc.pid)
        self.kill()

    def kill(self) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
