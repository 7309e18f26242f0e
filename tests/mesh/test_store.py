"""stagemesh.mesh.store against a real redis-server (the session's ``redis_url``)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest

from stagemesh.deploy.redis_server import free_port
from stagemesh.errors import Unavailable
from stagemesh.mesh.store import JournalEntry, Store, WorkerInfo
from stagemesh.mesh.topology import Chain, ExpertWorker, Stage, Topology


def _deployment() -> str:
    """A fresh namespace per test: tests share one redis-server."""
    return f"test-{uuid.uuid4().hex[:8]}"


def _run(redis_url: str, body, deployment: str | None = None):
    """Run ``body(store)`` on a fresh store in a fresh event loop."""

    async def main():
        async with await Store.connect(redis_url, deployment or _deployment()) as store:
            return await body(store)

    return asyncio.run(main())


def _stage(worker_id="chain0-stage0", **overrides) -> WorkerInfo:
    fields = dict(
        worker_id=worker_id, role="stage", chain=0, stage=0, start_layer=0, end_layer=4,
        address="127.0.0.1:50100", pid=1234, device="cpu", tp_size=1, started_at=1000.0,
    )
    return WorkerInfo(**{**fields, **overrides})


TTL_S = 1.5


def test_register_then_heartbeat_keeps_a_worker_alive_until_its_ttl_lapses(redis_url):
    expert = WorkerInfo(
        worker_id="expert-0", role="expert", experts={1: [0, 2], 3: [5]}, address="127.0.0.1:50200",
        pid=99, device="cuda:1", started_at=1000.0,
    )

    # NOTE: each read that must find the worker alive comes at least 0.6 s before its TTL lapses (a
    # loaded machine may delay a call that much), each that must find it dead after the lapse
    async def body(store: Store):
        await store.register_worker(_stage(), ttl_s=TTL_S)
        await store.register_worker(expert, ttl_s=30)
        assert await store.list_workers() == [_stage(), expert]
        assert (await store.list_workers())[0].experts == {}
        assert (await store.list_workers())[1].experts == {1: [0, 2], 3: [5]}, "layer keys come back as ints"
        await asyncio.sleep(0.75)
        assert await store.heartbeat("chain0-stage0", ttl_s=TTL_S) is True
        await asyncio.sleep(0.9)  # past the first TTL (0.75 + 0.9 > 1.5), within the renewed one
        assert [w.alive for w in await store.list_workers()] == [True, True], "the heartbeat renewed the TTL"
        await asyncio.sleep(0.75)  # past the renewed one: 0.9 + 0.75 > 1.5
        stage, still = await store.list_workers()
        assert stage.worker_id == "chain0-stage0" and stage.alive is False, "stays listed, not alive"
        assert still.alive is True
        assert await store.heartbeat("chain0-stage0", ttl_s=30) is True
        assert (await store.list_workers())[0].alive is True, "a late heartbeat revives it"

    _run(redis_url, body)


def test_deregister_forgets_the_worker_and_heartbeat_says_so(redis_url):
    async def body(store: Store):
        await store.register_worker(_stage("a"), ttl_s=30)
        await store.register_worker(_stage("b"), ttl_s=30)
        await store.heartbeat("a", ttl_s=30, figures={"busy": 0.5})
        await store.deregister_worker("a")
        assert [w.worker_id for w in await store.list_workers()] == ["b"]
        assert await store.get_metrics() == {}, "its metrics go with it"
        assert await store.heartbeat("a", ttl_s=30) is False, "a forgotten worker is told to re-register"
        await store.deregister_worker("never-registered")

    _run(redis_url, body)


def test_heartbeat_figures_become_metrics(redis_url):
    async def body(store: Store):
        await store.register_worker(_stage(), ttl_s=30)
        await store.heartbeat("chain0-stage0", ttl_s=30, figures={"kv_used": 0.25, "steps": 7})
        return await store.get_metrics()

    assert _run(redis_url, body) == {"chain0-stage0": {"kv_used": 0.25, "steps": 7}}


def _topology(model: str) -> Topology:
    stages = (Stage(0, 0, 2, "h:1"), Stage(1, 2, 4, "h:2", devices=("cuda:0", "cuda:1")))
    return Topology(model, num_layers=4, chains=(Chain(0, stages, (ExpertWorker(0, "h:3", experts={1: (0, 2)}),)),))


def test_topology_round_trip(redis_url):
    doc = _topology("/models/tiny")

    async def body(store: Store):
        assert await store.get_topology() is None
        await store.set_topology(doc)
        return await store.get_topology()

    assert _run(redis_url, body) == doc


def test_journal_open_append_get_move_close(redis_url):
    params = {"max_new_tokens": 8, "temperature": 0.7, "seed": 3, "stop_token_ids": [2]}

    async def body(store: Store):
        assert await store.journal_get("r1") is None
        await store.journal_open("r1", [1, 15, 27], params, chain=0)
        await store.journal_open("r2", [1, 9], {}, chain=0)
        await store.journal_append("r1", [101])
        await store.journal_append("r1", [])
        await store.journal_append_many({"r1": [102, 103], "r2": [7]})
        assert await store.journal_get("r1") == JournalEntry("r1", (1, 15, 27), params, 0, (101, 102, 103))
        assert await store.journal_by_chain(0) == ["r1", "r2"]

        await store.journal_move("r1", 1)
        assert (await store.journal_get("r1")).chain == 1
        assert (await store.journal_get("r1")).token_ids == (101, 102, 103), "moving keeps the tokens"
        assert await store.journal_by_chain(0) == ["r2"]
        assert await store.journal_by_chain(1) == ["r1"]

        await store.journal_close("r1")
        assert await store.journal_get("r1") is None
        assert await store.journal_by_chain(1) == []
        await store.journal_close("r1")  # closing twice is harmless
        with pytest.raises(KeyError, match="r1"):
            await store.journal_move("r1", 0)

    _run(redis_url, body)


def test_a_burst_of_opens_and_closes_goes_out_in_a_few_round_trips_on_one_connection(redis_url):
    import redis.asyncio

    from gateway.journal import JournalWriter

    async def body(store: Store):
        await store.journal_open("moved", [1], {}, chain=1)
        journal = JournalWriter(store, interval_s=0.05)
        watcher = redis.asyncio.from_url(redis_url)
        before = len(await watcher.client_list())
        journal.start()
        for i in range(64):  # a burst of requests, as the gateway records them
            journal.open(f"r{i}", [1, i], {"seed": i}, chain=0)
        journal.open("moved", [3], {}, chain=2)  # an id reused: its old entry is replaced
        await journal.flush()
        opened = len(await watcher.client_list()) - before
        assert await store.journal_by_chain(0) == sorted(f"r{i}" for i in range(64))
        assert await store.journal_by_chain(1) == [] and await store.journal_by_chain(2) == ["moved"]
        assert await store.journal_get("r7") == JournalEntry("r7", (1, 7), {"seed": 7}, 0, ())
        for i in range(64):
            journal.close(f"r{i}")
        await journal.stop()
        await store.journal_close_many(["moved", "never-opened"])
        assert await store.journal_by_chain(0) == [] and await store.journal_get("r7") is None
        await watcher.aclose()
        return opened

    assert _run(redis_url, body) <= 1  # not one connection per request


def test_reopening_a_request_starts_it_afresh(redis_url):
    async def body(store: Store):
        await store.journal_open("r", [1], {}, chain=0)
        await store.journal_append("r", [5, 6])
        await store.journal_open("r", [1, 2], {"seed": 1}, chain=2)
        assert await store.journal_get("r") == JournalEntry("r", (1, 2), {"seed": 1}, 2, ())
        assert await store.journal_by_chain(0) == []

    _run(redis_url, body)


def test_metrics_round_trip_and_expiry(redis_url):
    async def body(store: Store):
        await store.put_metrics("w1", {"tokens_per_s": 123.5, "queue": 3, "device": "cpu"})
        await store.put_metrics("w2", {"queue": 1}, ttl_s=1.0)  # read twice within it, even on a loaded machine
        await store.put_metrics("w1", {"queue": 4})
        assert await store.get_metrics() == {"w1": {"queue": 4}, "w2": {"queue": 1}}, "put replaces"
        await asyncio.sleep(1.15)
        assert await store.get_metrics() == {"w1": {"queue": 4}}

    _run(redis_url, body)


def test_deployments_do_not_see_each_other(redis_url):
    async def fill(store: Store):
        await store.register_worker(_stage(), ttl_s=30)
        await store.set_topology(_topology(store.deployment))
        await store.journal_open("r1", [1], {}, chain=0)
        await store.put_metrics("chain0-stage0", {"name": store.deployment})

    async def read(store: Store):
        return (
            [w.worker_id for w in await store.list_workers()],
            await store.get_topology(),
            await store.journal_by_chain(0),
            await store.get_metrics(),
        )

    a, b = _deployment(), _deployment()
    _run(redis_url, fill, a)
    assert _run(redis_url, read, b) == ([], None, [], {})
    _run(redis_url, fill, b)
    assert _run(redis_url, read, a) == (
        ["chain0-stage0"], _topology(a), ["r1"], {"chain0-stage0": {"name": a}},
    )


def test_bad_values_raise_value_error():
    with pytest.raises(ValueError, match="role='router'"):
        _stage(role="router")
    with pytest.raises(ValueError, match="deployment='a:b'"):
        Store(client=None, url="redis://x", deployment="a:b")


def test_unreachable_redis_raises_unavailable_naming_the_url():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(Unavailable, match=f"Redis at {url} is unreachable"):
        asyncio.run(Store.connect(url, timeout_s=1.0))


def test_the_expert_placement_round_trips_and_replicas_go_down_and_up(redis_url):
    from dataclasses import replace

    from stagemesh.mesh.store import ExpertReplica

    replicas = [
        ExpertReplica("expert-c0-e0", "127.0.0.1:50300", {0: [0, 2], 3: [1]}),
        ExpertReplica("expert-c0-e1", "127.0.0.1:50301", {0: [1, 3], 3: [0]}, live=False),
    ]

    async def body(store: Store):
        assert await store.get_placement(0) == []
        await store.set_placement(0, replicas)
        assert await store.get_placement(0) == replicas, "layer keys come back as ints, liveness kept"
        assert await store.get_placement(1) == [], "placements are per chain"
        await store.set_placement(0, [replace(replicas[0], live=False), replace(replicas[1], live=True)])
        assert [(r.worker_id, r.live) for r in await store.get_placement(0)] == [
            ("expert-c0-e0", False), ("expert-c0-e1", True)]
        await store.set_placement(0, replicas[:1])
        assert await store.get_placement(0) == replicas[:1], "a new placement replaces the old, liveness included"

    _run(redis_url, body)


def test_the_topology_is_written_if_absent_only(redis_url):
    async def body(store: Store):
        first, other = _topology("/models/a"), _topology("/models/b")
        before = await store.has_topology()
        wrote = [await store.set_topology_if_absent(first), await store.set_topology_if_absent(other)]
        return before, wrote, await store.has_topology(), await store.get_topology()

    assert _run(redis_url, body) == (False, [True, False], True, _topology("/models/a"))


def test_one_store_outlives_a_redis_restart_and_sees_its_new_run_id(tmp_path):
    from stagemesh.deploy.redis_server import start_local_redis

    async def scenario(server):
        async with await Store.connect(server.url, _deployment()) as store:
            await store.set_topology(_topology("/m"))
            before = await store.server_id()
            os.kill(server.pid, signal.SIGKILL)
            server._proc.wait()
            with pytest.raises(Unavailable, match="is unreachable"):
                await store.get_topology()
            server.restart()  # same port and data dir: the append-only file is reloaded
            after = await store.server_id()  # the same client, no reconnect by hand
            return before, after, await store.get_topology()

    with start_local_redis(data_dir=tmp_path) as server:
        before, after, topology = asyncio.run(scenario(server))
    assert before != after and topology == _topology("/m")


def test_appends_reach_their_own_requests_whatever_characters_the_ids_hold(redis_url):
    """The appends of many requests go in one script call whose keys are cut by their byte
    lengths: ids with separators, newlines and multi-byte characters must not bleed into each other."""
    ids = ["plain", "with\nnewline", "comma,1,2,", "colon:tokens", "émoji-🚀", "", "x" * 300, "tab\t#;"]

    async def body(store: Store):
        for rid in ids:
            await store.journal_open(rid, [1], {}, chain=0)
        await store.journal_append_many({rid: [k, 1000 + k] for k, rid in enumerate(ids)})
        await store.journal_append_many({rid: [7] for rid in ids[::2]} | {ids[1]: []})
        return {rid: (await store.journal_get(rid)).token_ids for rid in ids}

    assert _run(redis_url, body) == {rid: (k, 1000 + k, 7) if k % 2 == 0 else (k, 1000 + k)
                                     for k, rid in enumerate(ids)}
