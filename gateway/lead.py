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
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class LeadLock:
    """The lock on ``path``, held from ``acquire`` until the process exits."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def acquire(self) -> None:
        """Until this process holds the lock.

        NOTE: the wait is a blocking ``flock`` on a daemon thread, not an executor's: a standby
        stopped while it waits (SIGTERM) exits without joining a thread that may block for days."""
        if self.try_acquire():
            logger.info("holding %s: this gateway leads", self.path)
            return
        logger.info("standby: another gateway holds %s; taking over when it exits", self.path)
        loop = asyncio.get_running_loop()
        held: asyncio.Future[int] = loop.create_future()

        def wait() -> None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                loop.call_soon_threadsafe(_resolve, held, fd)
            except RuntimeError:  # the loop is closed: this process is stopping
                os.close(fd)

        threading.Thread(target=wait, name="gateway-lead", daemon=True).start()
        self._fd = await held
        logger.warning("the active gateway exited: this standby takes over")


def _resolve(held: asyncio.Future[int], fd: int) -> None:
    if held.done():  # the wait was cancelled (the standby is stopping): let the lock go
        os.close(fd)
    else:
        held.set_result(fd)
