"""Which gateway leads (``gateway.lead.LeadLock``): a real ``flock`` on a real file, held by this
process or by another one that is SIGKILLed or frozen (SIGSTOP) behind a real gRPC health server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from gateway.lead import Fence, LeadLock
from stagemesh.runtime.net import free_port

HOLD = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
from gateway.lead import LeadLock
assert LeadLock(sys.argv[1]).try_acquire()
if len(sys.argv) > 2:  # a leader that serves its health on this port
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(sys.argv[2])
    server.start()
print("held", flush=True)
time.sleep(600)
"""


def _holder(path, *args: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), *args], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_first_leads_and_a_second_waits_until_the_first_lets_go(tmp_path):
    path = tmp_path / "gateway.lock"
    first, second = LeadLock(path), LeadLock(path)
    assert first.try_acquire()
    assert not second.try_acquire()  # flock is per open file: two in one process exclude each other too

    async def scenario() -> None:
        waiting = asyncio.create_task(second.acquire())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        first.release()  # what the kernel does when the holder exits
        await asyncio.wait_for(waiting, timeout=5.0)

    asyncio.run(scenario())
    assert not LeadLock(path).try_acquire()  # the second holds it now


def test_a_standby_takes_the_lock_the_moment_a_sigkilled_holder_dies(tmp_path):
    path = tmp_path / "gateway.lock"
    holder = _holder(path)
    try:
        assert LeadLock(path).holder() == holder.pid

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
            first.release()
            await asyncio.sleep(0.2)  # the cancelled wait's thread takes the lock and lets it go

    asyncio.run(scenario())
    if holder_exits:
        assert LeadLock(path).try_acquire()
    else:
        assert not LeadLock(path).try_acquire()


def test_a_standby_kills_a_leader_that_froze_after_answering_and_takes_over(tmp_path):
    path, address = tmp_path / "gateway.lock", f"127.0.0.1:{free_port()}"
    holder = _holder(path, address)
    try:
        async def scenario() -> float:
            waiting = asyncio.create_task(LeadLock(path).acquire(Fence(address, after_s=1.0, every_s=0.1)))
            await asyncio.sleep(0.5)  # it answers: nothing happens
            assert not waiting.done() and holder.poll() is None
            os.kill(holder.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            await asyncio.wait_for(waiting, timeout=10.0)
            return time.monotonic() - frozen

        took = asyncio.run(scenario())
        # silent for after_s since its last answer (up to every_s before the freeze), then killed at once
        assert holder.wait(5) == -signal.SIGKILL and 0.8 <= took < 5.0, took
    finally:
        holder.kill()
        holder.wait()


def test_a_leader_that_never_answered_is_left_alone(tmp_path):
    """Still loading, not frozen: the fence arms only once the leader has answered."""
    path = tmp_path / "gateway.lock"
    holder = _holder(path)  # no health server at all
    try:
        async def scenario() -> bool:
            waiting = asyncio.create_task(LeadLock(path).acquire(Fence(f"127.0.0.1:{free_port()}", after_s=0.2,
                                                                       every_s=0.05)))
            await asyncio.sleep(1.5)
            done = waiting.done()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            return done

        assert not asyncio.run(scenario()) and holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
