"""When `stagemesh up` restarts a dead worker: soon after a long life, backing off after quick
deaths, and never again after several quick deaths in a row; never the gateway."""

from __future__ import annotations

import pytest

from stagemesh.deploy.launch import Mesh, UpOptions
from stagemesh.deploy.supervise import Lifeline, RestartPolicy

POLICY = RestartPolicy(first_backoff_s=0.5, max_backoff_s=4.0, quick_s=30.0, max_quick_deaths=4)


def test_a_worker_that_lived_long_is_restarted_after_the_first_backoff_every_time():
    life = Lifeline(POLICY, started_at=0.0)
    for start in (0.0, 100.0, 200.0):
        life.started_at = start
        assert life.died(start + 60.0) == start + 60.5
        life.restarted(start + 60.5)
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
    assert life.died(100.0) == 100.5 and life.quick_deaths == 0


def test_the_mesh_restarts_a_dead_worker_with_the_same_command_gives_it_up_and_never_restarts_the_gateway(tmp_path):
    mesh = Mesh(UpOptions(model=tmp_path, log_dir=tmp_path, restart_policy=POLICY))
    mesh.commands = {"gateway": ["sleep", "30"], "stage-c0-s0": ["sh", "-c", "exit 3"]}
    for name in mesh.commands:
        mesh._popen(name)
        mesh.lifelines[name] = Lifeline(POLICY, started_at=0.0)
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
        mesh.procs["gateway"].kill()
        mesh.procs["gateway"].wait()
        with pytest.raises(RuntimeError, match="^the gateway exited with code -9; stagemesh up does not restart"):
            mesh.supervise(now)
    finally:
        for proc in mesh.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
