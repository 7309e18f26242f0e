"""A worker's startup (``stagemesh.runtime.startup``) waits for a Redis that is down or
restarting, and for the topology to be written back, until its deadline: against a real
redis-server started late, killed and restarted empty."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from stagemesh.deploy.redis_server import start_local_redis
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Chain, Stage, Topology
from stagemesh.runtime.net import free_port
from stagemesh.runtime.startup import StartupError, start_worker

TOPOLOGY = Topology(model="/nowhere", num_layers=2, chains=(Chain(0, (Stage(0, 0, 2, "127.0.0.1:1"),)),))


async def _start(url: str, wait_s: float) -> tuple[str, float]:
    """What a worker would serve once started, and when it got there."""

    async def serve(place, store: Store) -> tuple[str, float]:
        await store.ping()
        return place, time.monotonic()

    return await start_worker(url, "default", wait_s, lambda t: t.chains[0].stages[0].address, serve)


async def _write_topology(url: str) -> None:
    async with await Store.connect(url) as store:
        await store.set_topology(TOPOLOGY)


def test_a_worker_started_before_redis_waits_for_it_and_its_topology(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    async def scenario():
        worker = asyncio.ensure_future(_start(url, wait_s=20.0))
        await asyncio.sleep(1.0)  # Redis down: connections refused
        assert not worker.done()
        server = start_local_redis(port, data_dir=tmp_path)  # up, but empty
        await asyncio.sleep(0.5)
        assert not worker.done()
        t_written = time.monotonic()
        await _write_topology(url)
        place, t_started = await asyncio.wait_for(worker, 5.0)
        return server, place, t_started - t_written

    server, place, delay = asyncio.run(scenario())
    server.stop()
    assert place == "127.0.0.1:1" and delay < 1.0


def test_a_worker_outlives_redis_dying_between_connecting_and_reading_its_topology(tmp_path):
    async def scenario(server):
        worker = asyncio.ensure_future(_start(server.url, wait_s=20.0))
        await asyncio.sleep(0.5)  # connected; no topology yet
        os.kill(server.pid, signal.SIGKILL)
        server._proc.wait()
        await asyncio.sleep(1.0)  # its reads fail: Redis is down
        assert not worker.done()
        server.restart()  # back empty (nothing was written), as after a lost append-only file
        await _write_topology(server.url)  # the launcher writes it back
        place, _ = await asyncio.wait_for(worker, 5.0)
        return place

    with start_local_redis(data_dir=tmp_path) as server:
        assert asyncio.run(scenario(server)) == "127.0.0.1:1"


def test_past_its_wait_a_worker_gives_up_saying_redis_is_unreachable():
    url = f"redis://127.0.0.1:{free_port()}/0"
    t0 = time.monotonic()
    with pytest.raises(StartupError, match=f"Redis at {url} is unreachable"):
        asyncio.run(_start(url, wait_s=1.0))
    assert time.monotonic() - t0 < 3.0
