"""Bring up a real mesh with `stagemesh up` (real processes, sockets and redis-server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from stagemesh import AsyncClient
from stagemesh.deploy.redis_server import free_port
from stagemesh.mesh.store import Store
from stagemesh.runtime import cpus
from stagemesh.runtime.tls import MeshTLS

LIVE_LOG_DIRS: list[Path] = []
"""The log dirs of the meshes ``stagemesh_up`` runs now: a failing test's report shows their last
warnings (``tests/conftest.py``), where CI keeps nothing else of them."""


@contextmanager
def stagemesh_up(model_dir: Path, log_dir: Path, *args: str, timeout: float = 180.0):
    """Yields (gateway address, redis url, the `up` process); SIGTERMs it afterwards.

    The Redis URL carries the run's password (read from the run's secrets dir, which the ready line
    names; an ``--insecure`` mesh has none); ``admin_tls(the process)`` reaches the workers directly."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagemesh.cli", "up", "--model", str(model_dir), "--port", str(port), "--log-dir", str(log_dir), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    LIVE_LOG_DIRS.append(log_dir)
    try:
        line = _wait_for_ready(proc, timeout, log_dir)
        redis_url = re.search(r"redis (\S+)", line).group(1)
        proc.ready_line = line
        secrets = re.search(r"secrets (\S+)", line)
        proc.secrets_dir = Path(secrets.group(1)) if secrets else None
        certs = re.search(r"certificates (\S+)", line)
        proc.tls_dir = Path(certs.group(1)) if certs else proc.secrets_dir and proc.secrets_dir / "tls"
        if proc.secrets_dir is not None:
            redis_url = (proc.secrets_dir / "redis-url").read_text().strip()
        yield f"127.0.0.1:{port}", redis_url, proc
    finally:
        LIVE_LOG_DIRS.remove(log_dir)
        stop_gracefully(proc)


def stop_gracefully(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM ``proc`` (a `stagemesh up`) unless it has ended, wait up to ``grace_s`` for it, then kill it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin_tls(up: subprocess.Popen) -> MeshTLS | None:
    """The admin identity of the mesh that ``stagemesh_up``'s process ``up`` runs, for reaching its
    workers, gateway or a frontend's own port directly; None for an ``--insecure`` one."""
    return None if up.tls_dir is None else MeshTLS.load(up.tls_dir, "admin")


def _wait_for_ready(proc: subprocess.Popen, timeout: float, log_dir: Path) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if line.startswith("stagemesh ready"):  # not the "logs in" line: its path may hold "ready"
                return line
        elif proc.poll() is not None:
            break
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))
    raise AssertionError(f"stagemesh up never printed ready (exit {proc.poll()}):\n{''.join(seen)}\n{logs}")


def expected_cores(ranks: int, bound: bool) -> list[list[int]]:
    """Each compute rank's cores: a disjoint share when bound and the cores go round, else all of them."""
    available = cpus.available()
    if not bound or ranks > len(available):
        return [available] * ranks
    n = len(available) // ranks
    return [available[r * n : (r + 1) * n] for r in range(ranks)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def still_alive(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Those of ``pids`` still alive once all are gone or ``timeout_s`` has passed (a process that was
    told to stop, or whose parent was, takes a moment to exit and be reaped on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def children(pid: int, module: str) -> list[int]:
    """Pids of ``pid``'s live children running ``python -m module``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"-m" in argv and module.encode() in argv and pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def client_connections(pid: int, port: int) -> int:
    """Established TCP connections process ``pid`` holds on local ``port`` (its clients)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
                count += local_port == port and state == "01" and inode in inodes
    return count


async def generate_all(addr: str, requests: list[dict]) -> list:
    """Every request (SDK ``generate`` keyword arguments) at once through the gateway at ``addr``."""
    async with AsyncClient(addr, timeout=120) as client:
        return await asyncio.gather(*(client.generate(**r) for r in requests))


async def worker_figures(redis_url: str) -> dict[str, dict]:
    """The figures every worker last published to Redis (deployment "default")."""
    async with await Store.connect(redis_url) as store:
        return await store.get_metrics()
