"""An exclusive ``flock`` on one of several files, held until the process exits: which of a
mesh's warm processes on one host does a job (``gateway.lead``: the gateway that schedules;
``frontend.frontend``: the frontends that serve the client port, and a spare that waits).

NOTE: the kernel releases a dead process's lock the moment it dies, SIGKILL included, so a
process blocked in ``flock`` wakes within microseconds: no lease to expire, no poll. A waiter
blocks on every file at once, each on a daemon thread of its own (not an executor's: a process
stopped while it waits exits without joining threads that may block for days); the first lock
it gets is the one it holds, and a thread that gets another one later lets it go at once, for
the next waiter. The holder writes its pid into the file it holds (``holder``): a process that
holds a lock is alive, so that pid cannot have been reused.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections.abc import Sequence
from pathlib import Path


class FileLocks:
    """One of ``paths``, held from ``try_acquire`` or ``wait`` until the process exits."""

    def __init__(self, paths: Sequence[Path | str]):
        if not paths:
            raise ValueError("FileLocks needs at least one file to lock")
        self.paths = tuple(Path(p) for p in paths)
        self.held: Path | None = None
        """The file this process holds the lock of; None while it holds none."""
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the first free lock, without waiting."""
        for path in self.paths:
            fd = _open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._hold(path, fd)
            return True
        return False

    async def wait(self) -> Path:
        """Until this process holds one of the locks; the file it holds."""
        loop = asyncio.get_running_loop()
        held: asyncio.Future[tuple[Path, int]] = loop.create_future()

        def wait_for(path: Path) -> None:
            fd = _open(path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                loop.call_soon_threadsafe(_resolve, held, path, fd)
            except RuntimeError:  # the loop is closed: this process is stopping
                os.close(fd)

        for path in self.paths:
            threading.Thread(target=wait_for, args=(path,), name=f"lock-{path.name}", daemon=True).start()
        self._hold(*await held)
        return self.held

    def holder(self, path: Path | None = None) -> int | None:
        """The pid of the process holding ``path``'s lock (the first file's by default), as it
        wrote it; None when none is written."""
        try:
            return int((path or self.paths[0]).read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Let the held lock go (what the kernel does when the process exits)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self.held = None, None

    def _hold(self, path: Path, fd: int) -> None:
        self._fd, self.held = fd, path
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _resolve(held: asyncio.Future[tuple[Path, int]], path: Path, fd: int) -> None:
    if held.done():  # another lock came first, or the wait was cancelled: let this one go
        os.close(fd)
    else:
        held.set_result((path, fd))
