"""gateway.keeper.StoreKeeper against a real redis-server of its own (these tests FLUSHALL it
and kill it, so not the session's shared one)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

import pytest

from gateway.keeper import StoreKeeper
from stagemesh.deploy.redis_server import LocalRedis, start_local_redis
from stagemesh.mesh.store import JournalEntry, Store
from stagemesh.mesh.topology import Chain, Stage, Topology

TOPOLOGY = Topology(
    model="/nowhere", num_layers=2,
    chains=tuple(Chain(c, (Stage(0, 0, 2, f"127.0.0.1:{10 + c}"),)) for c in range(2)),
)
PARAMS = {"max_new_tokens": 8, "temperature": 0.0, "seed": 7, "stop_token_ids": []}


@pytest.fixture
def server(tmp_path):
    with start_local_redis(data_dir=tmp_path) as server:
        yield server


class Gateway:
    """What the keeper reads of a gateway: its open requests, a placement re-writer, the journal lock."""

    def __init__(self):
        self.open = {"a": ([1, 2, 3], PARAMS, 0, [5, 6]), "b": ([4], PARAMS, 1, [])}
        self.placements = 0
        self.lock = asyncio.Lock()

    def snapshot(self):
        assert self.lock.locked(), "the snapshot is taken with the journal writer's lock held"
        return {rid: (list(p), dict(d), c, list(t)) for rid, (p, d, c, t) in self.open.items()}

    async def rewrite_placement(self) -> None:
        self.placements += 1

    def keeper(self, store: Store, interval_s: float = 1.0) -> StoreKeeper:
        return StoreKeeper(store, TOPOLOGY, self.rewrite_placement, self.snapshot,
                           journal_lock=self.lock, interval_s=interval_s)


def _flushall(port: int) -> None:
    """FLUSHALL, as an operator would type it (raw RESP: only the store imports ``redis``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        assert sock.recv(64) == b"+OK\r\n"


async def _journal(store: Store) -> dict[str, JournalEntry]:
    ids = [rid for c in TOPOLOGY.chains for rid in await store.journal_by_chain(c.index)]
    return {rid: await store.journal_get(rid) for rid in ids}


def _expected(gateway: Gateway) -> dict[str, JournalEntry]:
    return {rid: JournalEntry(rid, tuple(p), d, c, tuple(t)) for rid, (p, d, c, t) in gateway.open.items()}


async def _published(store: Store, gateway: Gateway) -> None:
    """The state as the gateway had written it before anything went wrong."""
    await store.set_topology(TOPOLOGY)
    for rid, (prompt, params, chain, tokens) in gateway.open.items():
        await store.journal_open(rid, prompt, params, chain)
        await store.journal_append(rid, tokens)


def test_a_flushed_redis_gets_the_topology_placement_and_journal_back(server: LocalRedis, caplog):
    async def scenario():
        gateway = Gateway()
        async with await Store.connect(server.url, "k") as store:
            await _published(store, gateway)
            keeper = gateway.keeper(store)
            assert await keeper.tick() is None and gateway.placements == 0  # all there: nothing to do
            _flushall(server.port)
            gateway.open["a"][3].append(9)  # streamed since
            with caplog.at_level(logging.WARNING, logger="gateway.keeper"):
                why = await keeper.tick()
            assert await keeper.tick() is None  # once per loss
            return gateway, why, await store.get_topology(), await _journal(store), keeper.rebuilds

    gateway, why, topology, journal, rebuilds = asyncio.run(scenario())
    assert why.startswith("the topology is gone") and rebuilds == 1 and gateway.placements == 1
    assert topology == TOPOLOGY
    assert journal == _expected(gateway) and journal["a"].token_ids == (5, 6, 9)
    assert [r.message for r in caplog.records] == [
        f"{why}: rebuilt the topology, the expert placement and the journal of 2 open request(s)"]


def test_a_restarted_redis_gets_the_writes_it_missed_and_loses_the_requests_that_ended(server: LocalRedis):
    async def scenario():
        gateway = Gateway()
        async with await Store.connect(server.url, "k") as store:
            await _published(store, gateway)
            keeper = gateway.keeper(store)
            await keeper.tick()
            os.kill(server.pid, signal.SIGKILL)  # the append-only file keeps what it held
            server._proc.wait()
            assert await keeper.tick() is None  # Redis down: no rebuild, no exception
            del gateway.open["b"]  # ended while Redis was down: its close was dropped
            gateway.open["a"][3].extend([7, 8])  # tokens whose appends were dropped
            server.restart()
            why = await keeper.tick()
            return gateway, why, await _journal(store), await keeper.tick()

    gateway, why, journal, again = asyncio.run(scenario())
    assert why.startswith("Redis restarted") and gateway.placements == 1 and again is None
    assert journal == _expected(gateway) and list(journal) == ["a"]
    assert journal["a"].token_ids == (5, 6, 7, 8)


def test_the_running_keeper_rebuilds_within_a_tick_and_outlives_redis_being_down(server: LocalRedis):
    async def scenario():
        gateway = Gateway()
        async with await Store.connect(server.url, "k") as store:
            await _published(store, gateway)
            task = asyncio.ensure_future(gateway.keeper(store, interval_s=0.1).run())
            await asyncio.sleep(0.3)
            os.kill(server.pid, signal.SIGKILL)
            server._proc.wait()
            for path in server.aof_paths:
                path.unlink()  # it comes back empty
            await asyncio.sleep(0.5)  # several ticks fail meanwhile
            assert not task.done()
            server.restart()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            while not await store.has_topology():
                assert loop.time() - t0 < 2.0, "the topology never came back"
                await asyncio.sleep(0.02)
            journal = await _journal(store)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return gateway, journal

    gateway, journal = asyncio.run(scenario())
    assert journal == _expected(gateway)
