"""What `stagemesh up` restarts, under a real mesh (pp=2, dp=1, one frontend): the same stage
worker SIGKILLed three times in a row mid-generation, each time after it served again, costs no
request and no token (the requests wait for their chain, the launcher restarts the worker after
its first backoff each time: it had served); a SIGKILLed gateway is restarted on the same
ports, after which new requests are served; and a stage worker, the gateway or the frontend
frozen (SIGSTOP) mid-generation is killed by the launcher once it answered no health check for
``--liveness-s`` and started again, at the cost of that wait and a restart, never of a request
or a token. Pids come from the mesh's status document."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest

from stagemesh import AsyncClient
from stagemesh.deploy.liveness import CHECK_EVERY_S
from tests.chaos.chaos_helpers import (
    greedy_requests,
    launcher_output,
    same_tokens,
    status,
    streams,
    timed_streams,
    wait_whole,
    worker,
)
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import children, stagemesh_up

pytestmark = pytest.mark.slow

STREAMS = 16
KILLS = int(os.environ.get("STAGEMESH_KILLS", "3"))
"""``STAGEMESH_KILLS=8 pytest -s tests/chaos/test_launcher.py`` for the issue's figure."""
SERVED_AGAIN_TOKENS = STREAMS * 4
"""Tokens streamed after a restart that show the chain served again."""
LIVENESS_S = 3.0
"""The mesh's ``--liveness-s``: a frozen process is killed this long after its last answer."""
FROZEN_BOUND_S = 60.0
"""A frozen process's streams that have not ended this long after the freeze never will: the
launcher did not kill it (the gateway's requests would wait for ever, a dp=1 chain's would fail
UNAVAILABLE after their 30 s failover wait)."""
LAUNCHER_PROBE_S = 1.5
"""Then this long for the launcher's readiness probe (every 0.5 s, four chances; a loaded machine delays it) to see
the worker SERVING: a death before that counts as one before serving, with a longer backoff."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama2"), num_layers=2,
                              max_position_embeddings=2048 if KILLS <= 3 else 4096)


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    """(client address, the `stagemesh up` process) of one mesh both tests kill processes of."""
    up_args = ("--pp", "2", "--frontends", "1", "--liveness-s", str(LIVENESS_S))
    with stagemesh_up(model_dir, tmp_path_factory.mktemp("logs"), *up_args) as (addr, _, up):
        yield addr, up
        assert up.poll() is None, "stagemesh up stopped"


class Killer:
    """Kills stage c0-s1 ``KILLS`` times while the streams run, each time once it served again."""

    def __init__(self, addr: str):
        self.addr = addr
        self.total = 0
        """Tokens streamed so far (``on_token``)."""
        self.kills: list[tuple[int, float]] = []
        """(pid, time) of each kill."""
        self.back_after: list[float] = []
        """Seconds from each kill until the worker was registered and healthy again."""

    def on_token(self, total: int) -> None:
        self.total = total

    async def run(self) -> None:
        async with AsyncClient(self.addr, timeout=10) as client:
            mark = 0
            for _ in range(KILLS):
                while self.total < mark + SERVED_AGAIN_TOKENS:  # the chain serves (again)
                    await asyncio.sleep(0.02)
                await asyncio.sleep(LAUNCHER_PROBE_S)
                victim = worker(await client.status(), "stage", 0, 1)
                os.kill(victim["pid"], signal.SIGKILL)
                self.kills.append((victim["pid"], time.monotonic()))
                await self._back(client, victim["pid"])
                self.back_after.append(time.monotonic() - self.kills[-1][1])
                mark = self.total

    @staticmethod
    async def _back(client: AsyncClient, pid: int) -> None:
        """Until the worker is registered again, heartbeating, with a new pid."""
        while (w := worker(await client.status(), "stage", 0, 1)) is None or w["pid"] == pid or not w["healthy"]:
            await asyncio.sleep(0.1)


def test_the_same_stage_killed_three_times_in_a_row_costs_no_request_and_no_token(mesh, model_dir):
    addr, up = mesh
    # long enough for every kill: each takes ~4-5 s here (restart, tokens again, the probe's wait)
    requests = greedy_requests(STREAMS, seed=11, max_new=1500 * max(1, KILLS) // 3)
    killer = Killer(addr)
    launcher_output(up)

    async def scenario():
        killing = asyncio.ensure_future(killer.run())
        got = await streams(addr, requests, killer.on_token)
        killing.cancel()
        await asyncio.gather(killing, return_exceptions=True)
        return got

    t0 = time.monotonic()
    got = asyncio.run(scenario())
    took = time.monotonic() - t0
    assert len(killer.kills) == KILLS, f"only {len(killer.kills)} kills before the streams ended ({took:.1f} s)"
    same_tokens(model_dir, requests, None, got)  # transformers' greedy tokens: a fault-free run would take ~20 s
    # each recovery timed while the streams ran (after the last, they may run on for a while)
    assert len(killer.back_after) == KILLS and max(killer.back_after) < 30.0, killer.back_after
    wait_whole(addr, 2, since=time.monotonic(), within=30.0)
    restarts = [line for line in launcher_output(up).splitlines() if "stage-c0-s1 exited with code -9" in line]
    assert len(restarts) == KILLS and all(line.endswith("restarting it at once") for line in restarts), restarts
    print(f"dp=1, stage c0-s1 SIGKILLed {KILLS} times in a row: {STREAMS} streams of {requests[0]['max_new_tokens']} "
          f"tokens whole, in {took:.1f} s; the worker back after {', '.join(f'{t:.1f}' for t in killer.back_after)} s")


def test_a_killed_gateway_is_restarted_and_serves_new_requests(mesh):
    addr, up = mesh
    before = status(addr)["gateway"]["pid"]
    os.kill(before, signal.SIGKILL)
    t_kill = time.monotonic()
    requests = greedy_requests(4, seed=12, max_new=8)
    while True:
        try:
            asyncio.run(streams(addr, requests))
            break
        except Exception as err:  # noqa: BLE001 - UNAVAILABLE until the new gateway serves
            assert time.monotonic() - t_kill < 60.0, f"no request served 60 s after the gateway's kill: {err}"
            time.sleep(0.2)
    took = time.monotonic() - t_kill
    after = status(addr)["gateway"]["pid"]
    assert after != before and up.poll() is None
    print(f"a new gateway served {took:.1f} s after the kill")


def _pid(addr: str, up: subprocess.Popen, victim: str) -> int:
    if victim == "frontend-0":
        (pid,) = children(up.pid, "frontend")
        return pid
    doc = status(addr)
    return doc["gateway"]["pid"] if victim == "gateway" else worker(doc, "stage", 0, 1)["pid"]


@pytest.mark.parametrize("victim", ["stage-c0-s1", "gateway", "frontend-0"])
def test_a_frozen_process_is_killed_and_restarted_at_no_cost_of_a_request_or_a_token(mesh, model_dir, victim):
    addr, up = mesh
    wait_whole(addr, 2, since=time.monotonic(), within=30.0)
    requests = greedy_requests(STREAMS, seed=13, max_new=120)
    pid = _pid(addr, up, victim)
    launcher_output(up)
    frozen_at: list[float] = []

    def freeze() -> None:
        os.kill(pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    try:
        got, longest = asyncio.run(asyncio.wait_for(timed_streams(addr, requests, freeze, fire_after=STREAMS * 4),
                                                    FROZEN_BOUND_S))
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # a failed test leaves no frozen process behind
        except ProcessLookupError:
            pass
    same_tokens(model_dir, requests, None, got)  # transformers' greedy tokens
    log = launcher_output(up)
    killed = [line for line in log.splitlines() if f"{victim} (pid {pid}) has answered no health check" in line]
    assert len(killed) == 1 and "killing it" in killed[0], log
    assert f"{victim} exited with code -9; restarting it at once" in log, log
    assert _pid(addr, up, victim) != pid and up.poll() is None
    # its last answer came at most one check (0.5 s) before the freeze: the kill, then the restart
    assert longest >= LIVENESS_S - CHECK_EVERY_S, f"the streams waited only {longest:.2f} s"
    print(f"{victim} frozen mid-generation: killed and restarted; {STREAMS} streams whole, the longest gap "
          f"{longest:.2f} s (--liveness-s {LIVENESS_S:g})")
