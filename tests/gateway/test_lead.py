"""Which gateway leads (``gateway.lead.LeadLock``): a real ``flock`` on a real file, held by this
process or by another one that is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from gateway.lead import LeadLock

HOLD = """
import sys, time
from gateway.lead import LeadLock
assert LeadLock(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_first_leads_and_a_second_waits_until_the_first_lets_go(tmp_path):
    path = tmp_path / "gateway.lock"
    first, second = LeadLock(path), LeadLock(path)
    assert first.try_acquire()
    assert not second.try_acquire()  # flock is per open file: two in one process exclude each other too

    async def scenario() -> None:
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        os.close(first._fd)  # what the kernel does when the holder exits
        await asyncio.wait_for(waiting, timeout=5.0)

    asyncio.run(scenario())
    assert not LeadLock(path).try_acquire()  # the second holds it now


def test_a_standby_takes_the_lock_the_moment_a_sigkilled_holder_dies(tmp_path):
    path = tmp_path / "gateway.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        async def scenario() -> float:
            waiting = asyncio.create_task(LeadLock(path).acquire())
            await asyncio.sleep(0.2)
            assert not waiting.done(), "the lock was free while another process held it"
            os.kill(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.wait_for(waiting, timeout=5.0)
            return time.monotonic() - killed

        took = asyncio.run(scenario())
    finally:
        holder.kill()
        holder.wait()
    assert took < 1.0, took  # no lease to expire: the kernel releases the lock as the holder dies


@pytest.mark.parametrize("holder_exits", [False, True])
def test_a_standby_stopped_while_it_waits_leaves_the_lock_to_others(tmp_path, holder_exits):
    """A cancelled wait (SIGTERM while it waits) never keeps the lock, even when its thread gets it after."""
    path = tmp_path / "gateway.lock"
    first = LeadLock(path)
    assert first.try_acquire()

    async def scenario() -> None:
        waiting = asyncio.create_task(LeadLock(path).acquire())
        await asyncio.sleep(0.2)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        if holder_exits:
            os.close(first._fd)
            await asyncio.sleep(0.2)  # the cancelled wait's thread takes the lock and lets it go

    asyncio.run(scenario())
    if holder_exits:
        assert LeadLock(path).try_acquire()
    else:
        assert not LeadLock(path).try_acquire()
