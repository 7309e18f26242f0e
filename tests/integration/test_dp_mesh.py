"""Data parallelism end to end: `stagemesh up --dp 2 --pp 2` on CPU, real processes and Redis.

Requests spread over both chains; a stage worker SIGKILLed mid-generation costs latency, not a
token (its chain's requests resume on the other chain from the journal), and `up` restarts it
until the mesh is whole again; with every chain down, requests fail UNAVAILABLE, never hang.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from stagemesh import AsyncClient, Client, Unavailable
from stagemesh.runtime.health import serving_sync
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.integration.mesh_helpers import stagemesh_up

pytestmark = pytest.mark.slow

RECOVERY_S = 60.0
CALL_TIMEOUT_S = 60.0
HEALTH_S = 10.0
"""How long the client port's health may take to follow the chains' (the frontends poll it twice a second)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama4"), num_layers=4)


@pytest.fixture(scope="module")
def reference(model_dir):
    return hf_model(model_dir)


def _requests(n: int, seed: int, max_new: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"token_ids": [rng.randrange(2, 320) for _ in range(rng.randint(2, 20))], "max_new_tokens": max_new,
             "ignore_eos": True} for _ in range(n)]


async def _streams(addr: str, requests: list[dict], on_token=None) -> list[list]:
    """Every request at once; each one's streamed items (token id, index), in arrival order."""
    async with AsyncClient(addr, timeout=CALL_TIMEOUT_S) as client:

        async def one(r: dict) -> list:
            items = []
            async for item in client.stream(**r):
                if item.token_id is not None:
                    items.append((item.token_id, item.index))
                    if on_token is not None:
                        on_token(len(items))
            return items

        return list(await asyncio.gather(*(one(r) for r in requests)))


def _check(reference, requests: list[dict], streams: list[list], what: str) -> None:
    for n, (req, items) in enumerate(zip(requests, streams)):
        assert [i for _, i in items] == list(range(req["max_new_tokens"])), f"{what} #{n}: indexes {[i for _, i in items]}"
        teacher_forcing_check(reference, req["token_ids"], [t for t, _ in items], request=f"{what} #{n}")


def _whole(status: dict, num_workers: int) -> bool:
    workers = [w for w in status["workers"] if w["role"] == "stage"]
    return len(workers) == num_workers and all(w["healthy"] for w in workers) and all(c["healthy"] for c in status["chains"])


def test_dp2_spreads_requests_and_a_killed_stage_costs_no_token_and_comes_back(model_dir, reference, tmp_path):
    with stagemesh_up(model_dir, tmp_path / "logs", "--pp", "2", "--dp", "2") as (addr, _, up):
        spread = _requests(8, seed=1, max_new=6)
        _check(reference, spread, asyncio.run(_streams(addr, spread)), "spread")
        with Client(addr, timeout=10) as client:
            status = client.status()
        assert [c["id"] for c in status["chains"]] == [0, 1]
        assert all(c["requests_served"] > 0 for c in status["chains"]), status["chains"]
        victim = next(w for w in status["workers"] if (w["role"], w["chain"], w["stage"]) == ("stage", 0, 1))

        killed = []

        def kill_once(tokens_so_far: int) -> None:
            if tokens_so_far == 4 and not killed:
                os.kill(victim["pid"], signal.SIGKILL)
                killed.append(time.monotonic())

        long = _requests(6, seed=2, max_new=32)
        _check(reference, long, asyncio.run(_streams(addr, long, kill_once)), "failover")
        assert killed, "the kill never happened"

        with Client(addr, timeout=10) as client:
            while not _whole(status := client.status(), 4):
                assert time.monotonic() < killed[0] + RECOVERY_S, f"not whole {RECOVERY_S:.0f} s after the kill: {status}"
                time.sleep(0.5)
        back = next(w for w in status["workers"] if (w["role"], w["chain"], w["stage"]) == ("stage", 0, 1))
        assert back["pid"] != victim["pid"] and back["address"] == victim["address"]
        assert status["gateway"]["chains"][0]["outages"] >= 1
        served = status["chains"][0]["requests_served"]

        again = _requests(6, seed=3, max_new=6)  # the restarted chain serves again, the same tokens
        _check(reference, again, asyncio.run(_streams(addr, again)), "after the restart")
        with Client(addr, timeout=10) as client:
            assert client.status()["chains"][0]["requests_served"] > served
        assert up.poll() is None


def test_with_every_chain_down_requests_fail_unavailable_at_once_and_never_hang(model_dir, reference, tmp_path):
    up = ("--pp", "2", "--dp", "2", "--failover-wait-s", "5", "--liveness-s", "0")  # frozen until SIGCONT
    with stagemesh_up(model_dir, tmp_path / "logs", *up) as (addr, _, _):
        with Client(addr, timeout=10) as client:
            stages = [w["pid"] for w in client.status()["workers"] if w["role"] == "stage"]

        async def scenario():
            async with AsyncClient(addr, timeout=CALL_TIMEOUT_S) as client:
                started = asyncio.Event()
                counts = [0] * 4

                async def one(n: int, r: dict) -> None:
                    async for item in client.stream(**r):
                        counts[n] += item.token_id is not None
                        if all(counts):
                            started.set()

                running = [asyncio.ensure_future(one(n, r)) for n, r in enumerate(_requests(4, seed=4, max_new=220))]
                await asyncio.wait_for(started.wait(), CALL_TIMEOUT_S)  # every request is generating
                for pid in stages:
                    os.kill(pid, signal.SIGSTOP)  # hung, not dead: with --liveness-s 0 `up` leaves them
                t_stop = time.monotonic()
                outcomes = await asyncio.gather(*running, return_exceptions=True)
                t_running = time.monotonic() - t_stop
                while any(c["healthy"] for c in (await client.status())["chains"]):
                    assert time.monotonic() - t_stop < RECOVERY_S, "a chain of frozen stages still reads healthy"
                    await asyncio.sleep(0.2)
                t0 = time.monotonic()
                try:
                    await client.generate(token_ids=[5, 6, 7], max_new_tokens=4, timeout=10)
                    new = None
                except Unavailable as err:
                    new = err
                t_new = time.monotonic() - t0
                deadline = time.monotonic() + HEALTH_S  # the frontends poll the gateway's health twice a second
                while (health := await asyncio.to_thread(serving_sync, addr)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                return outcomes, t_running, new, t_new, health

        try:
            outcomes, t_running, new, t_new, health_while_down = asyncio.run(scenario())
        finally:
            for pid in stages:
                os.kill(pid, signal.SIGCONT)
        t_cont = time.monotonic()
        with Client(addr, timeout=10) as client:  # the same workers answer again: both chains come back
            while not _whole(status := client.status(), 4):
                assert time.monotonic() < t_cont + RECOVERY_S, f"not whole {RECOVERY_S:.0f} s after SIGCONT: {status}"
                time.sleep(0.5)
        after = _requests(4, seed=5, max_new=8)
        _check(reference, after, asyncio.run(_streams(addr, after)), "after SIGCONT")
        deadline = time.monotonic() + HEALTH_S  # the frontends poll the gateway's health twice a second
        while not (health_after := serving_sync(addr)) and time.monotonic() < deadline:
            time.sleep(0.1)

    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert all("no healthy chain" in o.message for o in outcomes), [o.message for o in outcomes]
    assert t_running < 20, t_running  # found down in ~3 s, then the bounded wait for a chain (5 s)
    assert isinstance(new, Unavailable) and "no healthy chain" in new.message, new
    assert t_new < 2, t_new
    # health tells the truth: the client port says NOT_SERVING while no chain can serve
    assert health_while_down is False and health_after is True
