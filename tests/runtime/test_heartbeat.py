"""A worker's heartbeat across a real redis-server killed and restarted: with its append-only
file (the registry comes back as it was) and without it (Redis comes back empty: the worker
registers again by itself)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

from stagemesh.deploy.redis_server import LocalRedis, start_local_redis
from stagemesh.mesh.store import Store, WorkerInfo
from stagemesh.runtime.heartbeat import Heartbeat

INFO = WorkerInfo("stage-c0-s0", "stage", chain=0, stage=0, start_layer=0, end_layer=2, address="127.0.0.1:1")


def _kill(server: LocalRedis, *, lose_data: bool) -> None:
    os.kill(server.pid, signal.SIGKILL)
    server._proc.wait()
    if lose_data:
        for path in server.aof_paths:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


async def _registered_alive(url: str, timeout: float) -> float:
    """Seconds until the worker is registered and alive in the Redis at ``url``."""
    t0 = time.monotonic()
    async with await Store.connect(url, "hb") as reader:
        while not any(w.worker_id == INFO.worker_id and w.alive for w in await reader.list_workers()):
            assert time.monotonic() - t0 < timeout, "the worker never came back in the registry"
            await asyncio.sleep(0.02)
        return time.monotonic() - t0


def test_a_heartbeat_outlives_a_redis_restart_with_and_without_its_data(tmp_path):
    async def scenario(server: LocalRedis) -> list[float]:
        async with await Store.connect(server.url, "hb") as store:
            beat = Heartbeat(store, INFO, lambda: {"kv_blocks_used": 1}, interval_s=0.5, ttl_s=1.5)
            beat.start()
            await _registered_alive(server.url, 5.0)
            back = []
            for lose_data in (False, True):
                _kill(server, lose_data=lose_data)
                await asyncio.sleep(0.6)  # a beat or two fail meanwhile
                server.restart()
                back.append(await _registered_alive(server.url, 5.0))
            await beat.stop()
            async with await Store.connect(server.url, "hb") as reader:
                assert await reader.list_workers() == []  # deregistered on stop
            return back

    with start_local_redis(data_dir=tmp_path) as server:
        back = asyncio.run(scenario(server))
    # registered again within a retry (0.2 s) of Redis answering, not a whole beat
    assert all(t < 0.5 for t in back), back
