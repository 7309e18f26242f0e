"""The front door under real SIGKILLs: the gateway and a frontend die mid-generation, 32 greedy
streams each time, and every stream ends with the tokens of a fault-free run, each once. The
gateway is killed twice over: alone (the launcher restarts it) and with a warm standby beside it
(``stagemesh up --standby-gateway``: the standby takes over); and frozen (SIGSTOP) with a
standby, which kills it once it has answered nothing for ``FENCE_S`` and takes over. A frontend
is killed beside another serving one, and alone with a warm spare beside it
(``--spare-frontends 1``: the spare binds the client port the moment it dies).

Real `stagemesh up` (pp=2, two frontends on one port), real processes, sockets and Redis; the
SDK resumes the broken streams by itself (``stagemesh.client``), the launcher restarts the dead
process, and the gateway that comes back takes the open requests over (``gateway.hub``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gateway.journal import DEFAULT_FLUSH_INTERVAL_S
from stagemesh.runtime.health import serving_sync
from stagemesh.runtime.tls import MeshTLS
from tests.chaos.chaos_helpers import status, timed_streams
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import admin_tls, children, client_connections, pid_alive, stagemesh_up

pytestmark = pytest.mark.slow

STREAMS = 32
MAX_NEW = 40
KILL_AFTER = STREAMS * 6
"""Tokens received in all before the kill: mid-generation for every stream."""
FENCE_S = 2.0
"""How long the standby lets a frozen leader answer nothing before it kills it (10 s by default)."""
TRIALS = int(os.environ.get("STAGEMESH_TRIALS", "1"))
"""Kills per test (``STAGEMESH_TRIALS=10 pytest -s tests/chaos/test_front_door.py`` for the figures)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama4"), num_layers=4)


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with stagemesh_up(model_dir, logs, "--pp", "2", "--frontends", "2") as (addr, _, proc):
        yield addr, proc, logs


PROMPTS = [[(5 * i + j) % 250 + 3 for j in range(2 + i % 6)] for i in range(STREAMS)]


REQUESTS = [{"token_ids": p, "max_new_tokens": MAX_NEW, "ignore_eos": True} for p in PROMPTS]


async def run_streams(addr: str, fault=None) -> tuple[list[list[int]], float]:
    """Every prompt as its own client (its own connection, spread over the frontends); ``fault()``
    once KILL_AFTER tokens arrived; each stream's tokens and the longest gap a stream saw."""
    return await timed_streams(addr, REQUESTS, fault, KILL_AFTER, client_per_stream=True)


@pytest.fixture(scope="module")
def reference(mesh):
    results, _ = asyncio.run(run_streams(mesh[0]))
    assert all(len(r) == MAX_NEW for r in results)
    return results


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_once_journaled(pid: int) -> None:
    """SIGKILL the gateway ``pid`` two journal windows from now (the streams go on meanwhile): its
    journal is flushed a window after a write, and a gateway killed before the first flush leaves
    nothing there to take over (its requests then come back by the frontends' resubmission alone),
    which these tests' "took over" would read as a failure."""
    asyncio.get_running_loop().call_later(2 * DEFAULT_FLUSH_INTERVAL_S, kill, pid)


def wait_for_new(up: subprocess.Popen, module: str, old: int, serving: int, timeout: float = 30.0) -> int:
    """The restarted process's pid, once ``serving`` processes of ``module`` serve clients again
    (their own ports answer SERVING: the next trial starts with all of them up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in children(up.pid, module) if p != old]
        if new and len([p for p in children(up.pid, module) if own_port_serving(p, admin_tls(up))]) >= serving:
            return new[0]
        time.sleep(0.1)
    raise AssertionError(f"the launcher did not restart {module} within {timeout:.0f} s")


def own_port_serving(pid: int, tls: MeshTLS | None) -> bool:
    """``pid`` answers SERVING on its own port (``--own-port``; the gateway: ``--port``): mesh ports, mTLS."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    flag = b"--own-port" if b"--own-port" in argv else b"--port"
    port = int(argv[argv.index(flag) + 1])
    service = "" if flag == b"--own-port" else "stagemesh.v1.Scheduling"
    return serving_sync(f"127.0.0.1:{port}", 1.0, service, tls)


def test_a_gateway_killed_mid_generation_costs_no_token(mesh, reference):
    addr, proc, logs = mesh
    for trial in range(TRIALS):
        (gateway,) = children(proc.pid, "gateway")
        results, gap = asyncio.run(run_streams(addr, lambda: kill_once_journaled(gateway)))
        assert results == reference  # every stream whole, in order, each token once
        assert not pid_alive(gateway) and wait_for_new(proc, "gateway", gateway, serving=1)
        assert "took over" in (logs / "gateway.log").read_text()  # the new one read the journal
        print(f"gateway SIGKILL {trial + 1}/{TRIALS}: {STREAMS} streams whole; longest gap a stream saw {gap:.2f} s")


@pytest.fixture(scope="module")
def standby_mesh(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with stagemesh_up(model_dir, logs, "--pp", "2", "--frontends", "1", "--spare-frontends", "1",
                      "--standby-gateway", "--standby-fence-s", str(FENCE_S)) as (addr, _, proc):
        yield addr, proc, logs


def test_a_gateway_killed_with_a_standby_beside_it_costs_no_token_and_the_standby_takes_over(standby_mesh, reference):
    addr, proc, logs = standby_mesh
    for trial in range(TRIALS):
        # the standby (started with the mesh, or the gateway killed in the trial before) waits for the lock
        assert _eventually(lambda: _logged(logs).count("standby: another gateway holds") == trial + 1)
        active = status(addr)["gateway"]["pid"]
        (standby,) = [pid for pid in children(proc.pid, "gateway") if pid != active]
        results, gap = asyncio.run(run_streams(addr, lambda: kill_once_journaled(active)))
        assert results == reference
        # the standby leads now (not a process the launcher started after the kill) ...
        assert not pid_alive(active) and status(addr)["gateway"]["pid"] == standby
        # ... and the launcher started the killed one again, which waits as the next standby
        assert _eventually(lambda: len(children(proc.pid, "gateway")) == 2), children(proc.pid, "gateway")
        logged = _logged(logs)
        assert logged.count("this standby takes over") == trial + 1 and "took over" in logged  # from the journal
        print(f"gateway SIGKILL with a standby {trial + 1}/{TRIALS}: {STREAMS} streams whole; "
              f"longest gap a stream saw {gap:.2f} s")


def test_a_frozen_gateway_is_killed_by_its_standby_which_takes_over_and_costs_no_token(standby_mesh, reference):
    addr, proc, logs = standby_mesh
    assert _eventually(lambda: len(children(proc.pid, "gateway")) == 2)
    takeovers = _logged(logs).count("this standby takes over")
    assert _eventually(lambda: _logged(logs).count("standby: another gateway holds") == takeovers + 1)
    frozen = status(addr)["gateway"]["pid"]
    (standby,) = [pid for pid in children(proc.pid, "gateway") if pid != frozen]
    try:
        results, gap = asyncio.run(run_streams(addr, lambda: os.kill(frozen, signal.SIGSTOP)))
    finally:
        if pid_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    assert results == reference
    assert not pid_alive(frozen) and status(addr)["gateway"]["pid"] == standby
    assert f"the active gateway (pid {frozen}) has answered no health check" in _logged(logs)
    print(f"gateway SIGSTOP with a standby (fence {FENCE_S:.0f} s): {STREAMS} streams whole; "
          f"longest gap a stream saw {gap:.2f} s")


def test_a_lone_frontend_killed_with_a_spare_beside_it_costs_no_token_and_the_spare_takes_over(standby_mesh,
                                                                                                 reference):
    addr, proc, logs = standby_mesh
    (slot,) = logs.glob("frontend-slot-0-*.lock")  # the serving frontend holds it and wrote its pid there
    for trial in range(TRIALS):
        # the spare (started with the mesh, or the frontend killed in the trial before) waits for the slot
        assert _eventually(lambda: _logged(logs, "frontend").count("is a spare") == trial + 1)
        serving = int(slot.read_text())
        (spare,) = [pid for pid in children(proc.pid, "frontend") if pid != serving]
        assert _spares(addr) == [spare]  # the gateway's status names the spare as one
        results, gap = asyncio.run(run_streams(addr, lambda: kill(serving)))
        assert results == reference
        # the spare serves now (not a process the launcher started after the kill) ...
        assert not pid_alive(serving) and int(slot.read_text()) == spare and own_port_serving(spare, admin_tls(proc))
        assert _logged(logs, "frontend").count("this spare serves now") == trial + 1
        # ... and the launcher started the killed one again, which waits as the next spare
        assert _eventually(lambda: _logged(logs, "frontend").count("is a spare") == trial + 2)
        assert _eventually(lambda: _spares(addr) == [p for p in children(proc.pid, "frontend") if p != spare])
        print(f"lone frontend SIGKILL with a spare {trial + 1}/{TRIALS}: {STREAMS} streams whole; "
              f"longest gap a stream saw {gap:.2f} s")


def _spares(addr: str) -> list[int]:
    """The pids of the frontends the gateway's status document calls spares."""
    return [f["pid"] for f in status(addr)["gateway"]["frontends"] if f["spare"]]


def _logged(logs: Path, role: str = "gateway") -> str:
    return "".join(log.read_text() for log in sorted(logs.glob(f"{role}-*.log")))


def _eventually(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_frontend_killed_mid_generation_costs_no_token(mesh, reference):
    addr, proc, _ = mesh
    port = int(addr.rsplit(":", 1)[1])
    for trial in range(TRIALS):
        killed = []

        def kill_the_busiest():  # the kernel spreads clients over the frontends: kill one that has some
            frontend = max(children(proc.pid, "frontend"), key=lambda pid: client_connections(pid, port))
            killed.append((frontend, client_connections(frontend, port)))
            kill(frontend)

        results, gap = asyncio.run(run_streams(addr, kill_the_busiest))
        assert results == reference
        (frontend, clients), = killed
        assert clients > 0 and wait_for_new(proc, "frontend", frontend, serving=2)
        print(f"frontend SIGKILL {trial + 1}/{TRIALS} with {clients} client connection(s): {STREAMS} streams whole; "
              f"longest gap a stream saw {gap:.2f} s")
