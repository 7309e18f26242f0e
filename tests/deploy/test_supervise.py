"""When `stagemesh up` restarts a dead process: soon after it served, backing off after deaths
before it served, and never again after several of those in a row; the gateway and a local
Redis too. Lifeline is pure (the clock passed in); the Mesh tests run real processes: a small
gRPC health server stands in for a worker, and a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from stagemesh.deploy.launch import Mesh
from stagemesh.deploy.redis_keeper import RedisKeeper
from stagemesh.deploy.redis_server import server_pid, start_local_redis
from stagemesh.deploy.supervise import Lifeline, RestartPolicy
from stagemesh.deploy.up_plan import UpOptions, write_topology
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Chain, Stage, Topology
from stagemesh.runtime.health import serving_sync
from stagemesh.runtime.net import free_port
from stagemesh.runtime.procs import LIVENESS_S

POLICY = RestartPolicy(first_backoff_s=0.5, max_backoff_s=4.0, quick_s=30.0, max_quick_deaths=4)


def test_a_worker_that_lived_long_is_restarted_at_once_every_time():
    life = Lifeline(POLICY, started_at=0.0)
    for start in (0.0, 100.0, 200.0):
        life.started_at = start
        assert life.died(start + 60.0) == start + 60.0
        life.restarted(start + 60.0)
    assert life.quick_deaths == 0 and life.restarts == 3


def test_quick_deaths_double_the_backoff_up_to_the_cap_then_give_the_worker_up():
    life = Lifeline(POLICY, started_at=0.0)
    now, waits = 1.0, []
    while (at := life.died(now)) is not None:
        waits.append(at - now)
        life.restarted(at)
        now = at + 1.0  # dies a second after each start
    assert waits == [1.0, 2.0, 4.0]  # 0.5 s x 2, x 4, x 8 (the cap); the 4th quick death gives up
    assert life.quick_deaths == 4 and life.restart_at is None


def test_a_long_life_forgets_earlier_quick_deaths():
    life = Lifeline(POLICY, started_at=0.0)
    life.died(1.0)
    life.restarted(2.0)
    assert life.died(100.0) == 100.0 and life.quick_deaths == 0


# --- readiness: a probed process is judged by whether it served, not by how long it lived -------


def test_a_probed_worker_that_served_is_restarted_at_once_however_soon_it_died():
    life = Lifeline(POLICY, started_at=0.0, probed=True)
    now = 0.0
    for _ in range(8):  # dp=1, the same stage killed 8 times in a row, each time after it came back
        assert life.awaits_ready
        life.became_ready(now + 2.0)
        assert not life.awaits_ready
        assert life.died(now + 3.0) == now + 3.0 and life.quick_deaths == 0
        assert not life.awaits_ready  # dead: nothing to probe
        life.restarted(now + 3.0)
        now += 3.0
    assert life.restarts == 8 and life.restart_at is None


def test_a_probed_worker_that_never_served_counts_its_deaths_however_long_it_lived():
    life = Lifeline(POLICY, started_at=0.0, probed=True)
    now, waits = 0.0, []
    while (at := life.died(now + 100.0)) is not None:  # 100 s each, far past quick_s, never SERVING
        waits.append(at - now - 100.0)
        life.restarted(at)
        now = at
    assert waits == [1.0, 2.0, 4.0] and life.quick_deaths == 4


def test_serving_once_forgets_the_deaths_before_it():
    life = Lifeline(POLICY, started_at=0.0, probed=True)
    assert life.died(1.0) == 2.0
    life.restarted(2.0)
    assert life.died(3.0) == 5.0 and life.quick_deaths == 2
    life.restarted(5.0)
    life.became_ready(6.0)
    life.became_ready(9.0)  # the first sighting counts
    assert life.ready_at == 6.0
    assert life.died(7.0) == 7.0 and life.quick_deaths == 0
    life.restarted(7.0)
    assert life.ready_at is None and life.awaits_ready


def test_a_wait_after_serving_is_the_policys_and_does_not_grow():
    life = Lifeline(RestartPolicy(served_backoff_s=0.25, first_backoff_s=0.5), started_at=0.0, probed=True)
    for now in (10.0, 20.0, 30.0):
        life.became_ready(now - 5.0)
        assert life.died(now) == now + 0.25
        life.restarted(now + 0.25)
    assert life.died(31.0) == 32.0  # died before serving: first_backoff_s x 2


def test_an_unprobed_process_is_judged_by_its_lifetime_and_never_awaits_a_probe():
    life = Lifeline(POLICY, started_at=0.0)
    assert not life.awaits_ready
    life.became_ready(1.0)  # ignored without probes: frontends share a port
    assert life.died(2.0) == 3.0 and life.quick_deaths == 1


# --- the Mesh, with real processes ---------------------------------------------------------------

_HEALTH_SERVER = """
import sys, time, grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(2))
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(sys.argv[1])
server.start()
time.sleep(600)
"""


def _mesh(tmp_path, **opts) -> Mesh:
    return Mesh(UpOptions(model=tmp_path, log_dir=tmp_path, restart_policy=POLICY, frontends=1, **opts))


def _add(mesh: Mesh, name: str, command: list[str], address: str | None = None) -> None:
    mesh.commands[name] = command
    if address is not None:
        mesh.addresses[name] = (address, "")
    mesh._popen(name)
    mesh.lifelines[name] = Lifeline(POLICY, started_at=0.0, probed=address is not None)


def _kill_all(mesh: Mesh) -> None:
    for proc in mesh.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if mesh.redis_keeper is not None:
        mesh.redis_keeper.stop()


def _supervise_until(mesh: Mesh, done, what: str, timeout: float = 20.0) -> None:
    """``mesh.supervise()`` on the real clock every 0.05 s until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        mesh.supervise()
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f} s"
        time.sleep(0.05)


def test_the_mesh_restarts_a_worker_that_served_at_once_every_time_it_is_killed(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    mesh = _mesh(tmp_path)
    _add(mesh, "stage-c0-s0", [sys.executable, "-c", _HEALTH_SERVER, address], address)
    life = mesh.lifelines["stage-c0-s0"]
    try:
        for kill in range(4):
            _supervise_until(mesh, lambda: life.ready_at is not None, "probed SERVING")
            assert serving_sync(address)
            pid = mesh.procs["stage-c0-s0"].pid
            os.kill(pid, signal.SIGKILL)
            mesh.procs["stage-c0-s0"].wait()
            t_kill = time.monotonic()
            _supervise_until(mesh, lambda: mesh.procs["stage-c0-s0"].pid != pid, "restarted")
            assert time.monotonic() - t_kill < POLICY.served_backoff_s + 0.5
            assert life.quick_deaths == 0 and life.restarts == kill + 1
        assert "stage-c0-s0" not in mesh._gone
    finally:
        _kill_all(mesh)


def test_the_mesh_wakes_its_supervisor_when_a_child_exits_not_at_the_end_of_its_wait(tmp_path):
    mesh = _mesh(tmp_path)
    _add(mesh, "stage-c0-s0", ["sleep", "60"])
    _add(mesh, "stage-c0-s1", ["sleep", "0.3"])
    try:
        t0 = time.monotonic()
        mesh.wait_for_exit(60.0)
        assert time.monotonic() - t0 < 30.0, "slept its whole wait: a death would wait that long for its restart"
        assert mesh.procs["stage-c0-s1"].wait(5) == 0 and mesh.procs["stage-c0-s0"].poll() is None
        mesh.procs["stage-c0-s0"].kill()
        mesh.procs["stage-c0-s0"].wait()  # dead before the call: its death is not recorded yet
        t0 = time.monotonic()
        mesh.wait_for_exit(60.0)
        assert time.monotonic() - t0 < 30.0
        for life in mesh.lifelines.values():
            life.died(time.monotonic() + 60.0)  # recorded, restarts due later: nothing to wake for
        t0 = time.monotonic()
        mesh.wait_for_exit(0.3)
        assert time.monotonic() - t0 >= 0.25  # slept (select may round its timeout a little)
    finally:
        _kill_all(mesh)


def test_the_mesh_restarts_the_gateway_and_stops_with_an_error_once_it_gives_it_up(tmp_path):
    mesh = _mesh(tmp_path)
    _add(mesh, "gateway", ["sleep", "30"], address=f"127.0.0.1:{free_port()}")  # never SERVING
    _add(mesh, "stage-c0-s0", ["sh", "-c", "exit 3"])
    try:
        mesh.procs["stage-c0-s0"].wait()
        pids, now = [], 1.0
        while "stage-c0-s0" not in mesh._gone:
            mesh.supervise(now)
            if mesh.procs["stage-c0-s0"].pid not in pids:
                pids.append(mesh.procs["stage-c0-s0"].pid)
                mesh.procs["stage-c0-s0"].wait()
            now += 0.25
            assert now < 60
        assert len(pids) == 4 and now > 1.0 + 1 + 2 + 4  # the first run, then 3 restarts after backing off
        gateway = mesh.procs["gateway"].pid
        mesh.procs["gateway"].kill()
        mesh.procs["gateway"].wait()
        mesh.supervise(now)
        mesh.supervise(now + 1.0)  # 1 death before serving: 1 s of backoff
        assert mesh.procs["gateway"].pid != gateway and mesh.lifelines["gateway"].restarts == 1
        mesh.commands["gateway"] = ["sh", "-c", "exit 4"]  # from now on it cannot start
        mesh.procs["gateway"].kill()
        with pytest.raises(RuntimeError, match="^the gateway was given up on .* nothing can serve"):
            while True:
                mesh.supervise(now := now + 0.25)
                mesh.procs["gateway"].wait()
                assert now < 120
    finally:
        _kill_all(mesh)


def test_the_mesh_stops_with_an_error_once_every_frontend_is_given_up_on(tmp_path):
    mesh = _mesh(tmp_path)
    for name in ("frontend-0", "frontend-1"):
        _add(mesh, name, ["sh", "-c", "exit 2"])
    try:
        now = 1.0
        with pytest.raises(RuntimeError, match="^every frontend was given up on, so no client can reach the mesh"):
            while True:
                for proc in mesh.procs.values():
                    proc.wait()
                mesh.supervise(now := now + 0.25)
                assert now < 60
        assert mesh._gone == {"frontend-0", "frontend-1"}
    finally:
        _kill_all(mesh)


def test_with_a_standby_gateway_the_mesh_stops_only_once_both_gateways_are_given_up_on(tmp_path):
    mesh = _mesh(tmp_path)
    _add(mesh, "gateway-a", ["sleep", "60"])  # leads
    _add(mesh, "gateway-b", ["sh", "-c", "exit 2"])  # a standby that cannot start
    try:
        now = 1.0
        while "gateway-b" not in mesh._gone:
            mesh.procs["gateway-b"].wait()
            mesh.supervise(now := now + 0.25)  # no error: gateway-a still serves
            assert now < 60
        mesh.commands["gateway-a"] = ["sh", "-c", "exit 2"]
        mesh.procs["gateway-a"].kill()
        with pytest.raises(RuntimeError, match="^the gateway was given up on .* nothing can serve"):
            while True:
                mesh.procs["gateway-a"].wait()
                mesh.supervise(now := now + 0.25)
                assert now < 120
    finally:
        _kill_all(mesh)


def _topology() -> Topology:
    return Topology(model="/nowhere", num_layers=2, chains=(Chain(0, (Stage(0, 0, 2, "127.0.0.1:1"),)),))


async def _store_call(url: str, call):
    async with await Store.connect(url, "default") as store:
        return await call(store)


def test_the_mesh_restarts_its_redis_on_the_same_port_with_its_data_and_rewrites_a_lost_topology(tmp_path):
    mesh = _mesh(tmp_path)
    mesh.topology = _topology()
    mesh.redis_keeper = RedisKeeper(start_local_redis(data_dir=tmp_path / "redis"), POLICY, LIVENESS_S,
                                    on_back=mesh._rewrite_topology)  # as Mesh.start has it
    mesh.redis_url = mesh.redis.url
    try:
        asyncio.run(write_topology(mesh.redis_url, "default", mesh.topology))
        asyncio.run(_store_call(mesh.redis_url, lambda s: s.journal_open("r1", [1, 2], {}, 0)))
        for lose_data in (False, True, False):
            pid = server_pid(mesh.redis.port)
            os.kill(pid, signal.SIGKILL)
            mesh.redis._proc.wait()
            if lose_data:
                for path in mesh.redis.aof_paths:
                    path.unlink()
            t_kill = time.monotonic()
            mesh.supervise()  # a Redis that served comes back at once
            assert time.monotonic() - t_kill < 2.0
            assert server_pid(mesh.redis.port) not in (None, pid)
            topology = asyncio.run(_store_call(mesh.redis_url, lambda s: s.get_topology()))
            journaled = asyncio.run(_store_call(mesh.redis_url, lambda s: s.journal_by_chain(0)))
            assert topology == mesh.topology  # kept, or written again by the launcher
            assert journaled == ([] if lose_data else ["r1"])
            if lose_data:
                asyncio.run(_store_call(mesh.redis_url, lambda s: s.journal_open("r1", [1, 2], {}, 0)))
        assert mesh.redis_keeper.life.restarts == 3 and mesh.redis_keeper.life.quick_deaths == 0
    finally:
        _kill_all(mesh)


def test_a_frozen_redis_is_killed_and_restarted_on_its_port_with_its_data(tmp_path):
    back = []
    keeper = RedisKeeper(start_local_redis(data_dir=tmp_path / "redis"), POLICY, 1.0, on_back=lambda: back.append(1))
    try:
        asyncio.run(_store_call(keeper.redis.url, lambda s: s.journal_open("r1", [1, 2], {}, 0)))
        frozen = server_pid(keeper.redis.port)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # answering: never killed
            keeper.keep(time.monotonic())
            time.sleep(0.1)
        assert server_pid(keeper.redis.port) == frozen and keeper.life.restarts == 0
        os.kill(frozen, signal.SIGSTOP)
        t_freeze = time.monotonic()
        while keeper.life.restarts == 0:
            assert time.monotonic() - t_freeze < 10.0, "a Redis frozen for 10 s was not restarted"
            keeper.keep(time.monotonic())
            time.sleep(0.05)
        took = time.monotonic() - t_freeze
        assert server_pid(keeper.redis.port) not in (None, frozen) and back == [1]
        assert took >= 1.0 - 0.5, took  # its last answer came at most one check (0.5 s) before the freeze
        journaled = asyncio.run(_store_call(keeper.redis.url, lambda s: s.journal_by_chain(0)))
        assert journaled == ["r1"]  # back from its append-only file
    finally:
        keeper.stop()


def test_two_meshes_given_one_log_dir_share_no_lock_file(tmp_path):
    """The spare frontends' slots and the standby gateways' lock are named for the client port too:
    two meshes logging into one directory (on two ports: ``up`` refuses a port in use) would
    otherwise take each other's slots, and one of them would have no frontend serving."""
    def locks(port: int) -> set[str]:
        mesh = _mesh(tmp_path, port=port, spare_frontends=2, standby_gateway=True)
        slots = mesh._slot_args()
        assert slots[0] == "--slot-files" and len(slots) == 2  # one slot per serving frontend (one here)
        return {*slots[1:], str(mesh._lock_file("gateway"))}

    first, second = locks(50051), locks(50061)
    assert len(first) == len(second) == 2 and not first & second
    assert all(Path(path).parent == tmp_path for path in first | second)
