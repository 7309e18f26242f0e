"""A local redis-server with a password (``start_local_redis(password=...)``): clients without it
are refused, the password never reaches its command line, and a restart keeps asking for it."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import pytest

from stagemesh.deploy.redis_server import server_pid, start_local_redis
from stagemesh.errors import Unavailable
from stagemesh.mesh.store import Store

PASSWORD = 'a "quoted" pass\\word with spaces'


async def _ping(url: str) -> bool:
    async with await Store.connect(url) as store:
        return await store.get_topology() is None


def test_redis_asks_for_the_password_which_stays_off_its_command_line(tmp_path):
    with start_local_redis(data_dir=tmp_path / "data", password=PASSWORD, secrets_dir=tmp_path) as server:
        assert asyncio.run(_ping(server.url))
        with pytest.raises(Unavailable, match="refused the password"):
            asyncio.run(_ping(server.public_url))
        assert server_pid(server.port) is None and server_pid(server.port, PASSWORD) == server.pid
        assert PASSWORD.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert stat.S_IMODE((tmp_path / "redis.conf").stat().st_mode) == 0o600
        assert "***" in repr(Store(None, server.url).url) and PASSWORD not in repr(server)

        os.kill(server.pid, signal.SIGKILL)
        server._proc.wait()
        server.restart()  # the same config file: the same password
        assert asyncio.run(_ping(server.url))
        with pytest.raises(Unavailable):
            asyncio.run(_ping(server.public_url))
