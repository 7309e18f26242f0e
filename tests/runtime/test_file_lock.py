"""One of several files' locks (``stagemesh.runtime.file_lock.FileLocks``): real ``flock`` on real
files, held by this process (flock is per open file, so two holders in one process exclude each
other) or by another process that is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from stagemesh.runtime.file_lock import FileLocks

HOLD = """
import sys, time
from stagemesh.runtime.file_lock import FileLocks
assert FileLocks([sys.argv[1]]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_first_free_file_is_taken_and_its_holder_pid_written(tmp_path):
    first, second = tmp_path / "slot-0.lock", tmp_path / "slot-1.lock"
    taken = FileLocks([first])
    assert taken.try_acquire() and taken.held == first
    locks = FileLocks([first, second])
    assert locks.try_acquire() and locks.held == second
    assert locks.holder(second) == locks.holder(first) == os.getpid()
    assert not FileLocks([first, second]).try_acquire()  # both held


def test_a_waiter_holds_the_first_file_let_go_and_lets_a_later_one_go_for_the_next(tmp_path):
    paths = [tmp_path / "slot-0.lock", tmp_path / "slot-1.lock"]
    holders = [FileLocks([path]) for path in paths]
    assert all(holder.try_acquire() for holder in holders)
    waiter = FileLocks(paths)

    async def scenario() -> None:
        waiting = asyncio.create_task(waiter.wait())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        holders[1].release()  # what the kernel does when the holder exits
        assert await asyncio.wait_for(waiting, timeout=5.0) == paths[1]
        holders[0].release()
        await asyncio.sleep(0.2)  # the waiter's other thread takes that lock and lets it go at once

    asyncio.run(scenario())
    assert waiter.held == paths[1] and waiter.holder(paths[1]) == os.getpid()
    assert not FileLocks([paths[1]]).try_acquire()  # the waiter holds it
    assert FileLocks([paths[0]]).try_acquire()  # free again for the next waiter


def test_a_waiter_takes_the_lock_of_a_sigkilled_holder(tmp_path):
    paths = [tmp_path / "slot-0.lock", tmp_path / "slot-1.lock"]
    holders = [subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
               for path in paths]
    try:
        assert all(holder.stdout.readline().strip() == "held" for holder in holders)
        waiter = FileLocks(paths)
        assert not waiter.try_acquire() and waiter.holder(paths[0]) == holders[0].pid

        async def scenario() -> float:
            waiting = asyncio.create_task(waiter.wait())
            await asyncio.sleep(0.2)
            killed = time.monotonic()
            holders[0].kill()
            assert await asyncio.wait_for(waiting, timeout=5.0) == paths[0]
            return time.monotonic() - killed

        print(f"took the lock {asyncio.run(scenario()) * 1e3:.1f} ms after the SIGKILL")
        assert waiter.holder(paths[0]) == os.getpid()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_no_file_is_refused():
    with pytest.raises(ValueError, match="at least one file"):
        FileLocks([])
