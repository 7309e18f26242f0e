"""Redis SIGKILLed mid-generation under a real `stagemesh up` (pp=2, dp=1, one frontend): the
streams finish with transformers' greedy tokens, the launcher restarts Redis on its port,
and the mesh is whole again (workers registered, chain in service, new requests served)
within 10 s of the kill, measured while the killed streams still run (so their own length
is not counted). Once with Redis's append-only file kept, once with it deleted: Redis comes
back empty, the launcher writes the topology back, the workers register again, and the
gateway's ``StoreKeeper`` rebuilds the journal of the requests still running (a long *canary*
request shows it: its journal entry is back while it runs). And Redis frozen (SIGSTOP): the
launcher kills it once it answered nothing for ``--liveness-s`` and restarts it the same way."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from urllib.parse import urlsplit

import pytest

from stagemesh import AsyncClient
from stagemesh.deploy.redis_server import server_pid
from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import JournalEntry, Store
from tests.chaos.chaos_helpers import (
    CALL_TIMEOUT_S,
    greedy_requests,
    launcher_output,
    same_tokens,
    status,
    streams,
    whole,
)
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import stagemesh_up

pytestmark = pytest.mark.slow

STREAMS = 24
HEALTHY_WITHIN_S = 10.0
LIVENESS_S = 3.0
"""The mesh's ``--liveness-s``: a frozen Redis is killed this long after its last answer."""
CANARY = {"token_ids": [3, 4, 5], "max_new_tokens": 700, "ignore_eos": True, "request_id": "canary"}
"""Long enough to outlast Redis's restart and the keeper's next look (about 2 s)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama2"), num_layers=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def mesh(model_dir, tmp_path_factory):
    """(client address, Redis URL, log dir, the `up` process) of one mesh the tests kill and freeze Redis under."""
    logs = tmp_path_factory.mktemp("logs")
    up_args = ("--pp", "2", "--frontends", "1", "--liveness-s", str(LIVENESS_S))
    with stagemesh_up(model_dir, logs, *up_args) as (addr, redis_url, up):
        yield addr, redis_url, logs, up
        assert up.poll() is None, "stagemesh up stopped"


def _kill_redis(port: int, password: str | None, aof_dir, *, lose_data: bool) -> tuple[int, float]:
    pid = server_pid(port, password)
    os.kill(pid, signal.SIGKILL)
    if lose_data:  # before the launcher notices (it looks every 0.5 s): it restarts an empty Redis
        for path in (aof_dir / "appendonly.aof", aof_dir / "appendonlydir"):
            if path.is_file():
                path.unlink()
    return pid, time.monotonic()


async def _last_entry(redis_url: str, request_id: str, running: asyncio.Future) -> JournalEntry | None:
    """The request's journal entry as last read from Redis (every 0.1 s) before ``running`` ended."""
    last = None
    while not running.done():
        try:
            async with await Store.connect(redis_url) as store:
                while not running.done():
                    last = await store.journal_get(request_id) or last
                    await asyncio.sleep(0.1)
        except StagemeshError:  # Redis down
            await asyncio.sleep(0.1)
    return last


TRIALS = int(os.environ.get("STAGEMESH_TRIALS", "1"))
"""Kills with the append-only file kept (``STAGEMESH_TRIALS=5 pytest -s tests/chaos/test_redis.py``)."""


async def _recovery(addr: str, port: int, password: str | None, kill: asyncio.Future,
                    within_s: float = HEALTHY_WITHIN_S) -> tuple[float, float]:
    """Seconds from the kill until the mesh is whole again, and until new requests are served,
    measured while the killed streams and the canary still run (what they cost is not counted)."""
    pid, t_kill = await kill
    while await asyncio.to_thread(server_pid, port, password) in (None, pid):
        assert time.monotonic() - t_kill < within_s, "the launcher did not restart Redis on its port"
        await asyncio.sleep(0.05)
    doc = None
    async with AsyncClient(addr, timeout=CALL_TIMEOUT_S) as client:
        while True:
            try:
                doc = await client.status(timeout=2.0)
                if whole(doc, 2):
                    break
            except StagemeshError as err:  # the gateway reads Redis for it; keep asking
                doc = repr(err)
            assert time.monotonic() - t_kill < within_s, f"not whole {within_s:.0f} s after the fault: {doc}"
            await asyncio.sleep(0.1)
    whole_after = time.monotonic() - t_kill
    new = await streams(addr, greedy_requests(4, seed=8, max_new=8))
    assert [len(t) for t in new] == [8] * 4, new
    return whole_after, time.monotonic() - t_kill


@pytest.mark.parametrize("lose_data", [False] * TRIALS + [True],
                         ids=[f"with-aof-{i}" for i in range(TRIALS)] + ["aof-deleted"])
def test_redis_sigkilled_mid_generation_costs_no_token_and_the_mesh_is_whole_within_10s(mesh, model_dir, lose_data):
    addr, redis_url, logs, _ = mesh
    port, password = urlsplit(redis_url).port, urlsplit(redis_url).password  # `up`'s Redis asks for a password
    requests = greedy_requests(STREAMS, seed=7, max_new=200)

    async def scenario():
        kill = asyncio.get_running_loop().create_future()

        def kill_once(total: int) -> None:
            if total >= STREAMS * 8 and not kill.done():  # every stream is generating
                kill.set_result(_kill_redis(port, password, logs / "redis", lose_data=lose_data))

        canary = asyncio.ensure_future(streams(addr, [CANARY]))
        recovery = asyncio.ensure_future(_recovery(addr, port, password, kill))
        got = await streams(addr, requests, kill_once)
        if not kill.done():
            recovery.cancel()
            pytest.fail("the kill never happened: the streams ended first")
        whole_after, served_after = await recovery
        entry = await _last_entry(redis_url, CANARY["request_id"], canary)
        return got, entry, (await canary)[0], whole_after, served_after

    got, entry, canary, whole_after, served_after = asyncio.run(scenario())
    same_tokens(model_dir, requests, None, got)  # transformers' greedy tokens
    print(f"Redis SIGKILL ({'data deleted' if lose_data else 'AOF kept'}): {STREAMS} streams whole, "
          f"mesh whole {whole_after:.1f} s and new requests served {served_after:.1f} s after the kill")
    assert served_after < HEALTHY_WITHIN_S, f"new requests served {served_after:.1f} s after the kill, not within 10 s"
    assert whole(status(addr), 2), "the mesh did not stay whole"
    # NOTE: the journal as the gateway's StoreKeeper (gateway/keeper.py) rebuilds it: without it an
    # emptied Redis has no entry for the canary, and a reloaded one lacks the tokens whose writes
    # the gateway dropped while Redis was down
    assert len(canary) == CANARY["max_new_tokens"]
    assert entry is not None, "the running canary's journal entry never came back"
    assert entry.prompt_token_ids == tuple(CANARY["token_ids"]) and entry.chain == 0
    assert len(entry.token_ids) > len(canary) // 2 and canary[:len(entry.token_ids)] == list(entry.token_ids), (
        f"the journal of the running canary is not what it streamed: {len(entry.token_ids)} tokens journaled")


def test_a_frozen_redis_is_killed_and_restarted_and_costs_no_token(mesh, model_dir):
    addr, redis_url, _, up = mesh
    port, password = urlsplit(redis_url).port, urlsplit(redis_url).password
    requests = greedy_requests(STREAMS, seed=9, max_new=200)
    launcher_output(up)
    frozen: list[int] = []

    async def scenario():
        freeze = asyncio.get_running_loop().create_future()

        def freeze_once(total: int) -> None:
            if total >= STREAMS * 8 and not freeze.done():
                frozen.append(server_pid(port, password))
                os.kill(frozen[0], signal.SIGSTOP)
                freeze.set_result((frozen[0], time.monotonic()))

        recovery = asyncio.ensure_future(_recovery(addr, port, password, freeze, LIVENESS_S + HEALTHY_WITHIN_S))
        got = await streams(addr, requests, freeze_once)
        assert freeze.done(), "the freeze never happened: the streams ended first"
        return got, await recovery

    try:
        got, (whole_after, served_after) = asyncio.run(scenario())
    finally:
        try:
            os.kill(frozen[0], signal.SIGCONT)  # a failed test leaves no frozen Redis behind
        except (IndexError, ProcessLookupError):
            pass
    same_tokens(model_dir, requests, None, got)  # transformers' greedy tokens
    log = launcher_output(up)
    assert f"redis-server (pid {frozen[0]}) has answered nothing for" in log, log
    print(f"Redis SIGSTOP: {STREAMS} streams whole; killed after --liveness-s {LIVENESS_S:g} and restarted: "
          f"mesh whole {whole_after:.1f} s and new requests served {served_after:.1f} s after the freeze")
    assert whole(status(addr), 2), "the mesh did not stay whole"
