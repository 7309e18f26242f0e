"""Which of a mesh's gateway processes schedules: the one that holds an exclusive lock on a file.

NOTE: a warm standby (``stagemesh up --standby-gateway``). A restarted gateway's streams wait for
a new interpreter and its imports (~0.5 s on this VM) before its takeover even begins; a standby
has done both, and has read Redis's topology and the model's tokenizer, when the active gateway
dies. Every gateway of the mesh is started with the same ``--lock-file`` and blocks in ``flock``
until it holds the lock: the kernel releases a dead process's lock the moment it dies, SIGKILL
included, so the standby wakes within microseconds, with no lease to expire and no poll. Only
then does it bind the Scheduling port (which the dead one's listening socket no longer holds),
take a new epoch and take over the journal, as any restarted gateway does; the launcher starts
the dead one again, and it becomes the next standby. A lock file serves gateways on ONE host
(``stagemesh up``); a standby on another host would need a lease in Redis instead (not built).

A frozen gateway (SIGSTOP, a stuck loop) keeps its lock and its sockets, so it would hold the
mesh forever: the standby also checks the leader's health (``Fence``) and SIGKILLs it, by the pid
it wrote into the lock file, once it has answered before and then answered nothing for
``after_s`` (NOT_SERVING is an answer: a gateway with no chain in service is alive). The kernel
then hands the lock over as for any death. The pid is the lock holder's own: a process that
holds the lock is alive, so the pid cannot have been reused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagemesh.runtime.file_lock import FileLocks
from stagemesh.runtime.health import HealthProbe
from stagemesh.runtime.tls import MeshTLS

logger = logging.getLogger(__name__)

FENCE_AFTER_S = 10.0
"""How long a leader that answered before may answer no health check before its standby kills it."""


class LeadLock(FileLocks):
    """The lock on ``path`` (``stagemesh.runtime.file_lock``), held from ``acquire`` until the process exits."""

    def __init__(self, path: Path):
        super().__init__((path,))

    @property
    def path(self) -> Path:
        return self.paths[0]

    async def acquire(self, fence: Fence | None = None) -> None:
        """Until this process holds the lock; with ``fence``, a leader that freezes is killed."""
        if self.try_acquire():
            logger.info("holding %s: this gateway leads", self.path)
            return
        logger.info("standby: another gateway holds %s; taking over when it exits", self.path)
        watching = asyncio.create_task(fence.run(self.holder)) if fence is not None else None
        try:
            await self.wait()
        finally:
            if watching is not None:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
        logger.warning("the active gateway exited: this standby takes over")


@dataclass(frozen=True)
class Fence:
    """A standby's check of the leader: SIGKILL it once it answered nothing for ``after_s``."""

    address: str
    """The leader's ``Scheduling`` port (the standby's own, once it leads)."""
    after_s: float = FENCE_AFTER_S
    tls: MeshTLS | None = None
    every_s: float = 0.5

    async def run(self, holder: Callable[[], int | None]) -> None:
        probe = HealthProbe(timeout_s=min(1.0, self.after_s / 4), tls=self.tls)  # one channel while it answers
        try:
            await self._watch(probe, holder)
        finally:
            await probe.close()

    async def _watch(self, probe: HealthProbe, holder: Callable[[], int | None]) -> None:
        loop = asyncio.get_running_loop()
        last_answer: float | None = None  # before its first answer the leader may be loading, not frozen
        while True:
            if await probe.answers(self.address):
                last_answer = loop.time()
            elif last_answer is not None and loop.time() - last_answer >= self.after_s:
                pid = holder()
                if pid is not None:
                    logger.warning("the active gateway (pid %d) has answered no health check for %.1f s: killing "
                                   "it to take over", pid, loop.time() - last_answer)
                    os.kill(pid, signal.SIGKILL)
                    return
            await asyncio.sleep(self.every_s)

