"""A store with the mesh key against a real redis-server: what an attacker writes straight into
Redis (a raw client, no key) is refused, reported, and the last good copy kept."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
import redis.asyncio

from stagemesh.mesh.signing import RefusedDocument, Signer
from stagemesh.mesh.store import ExpertReplica, JournalEntry, Store, WorkerInfo
from stagemesh.mesh.topology import Chain, Stage, Topology

KEY = bytes(range(32))
TOPOLOGY = Topology(model="/models/tiny", num_layers=4,
                    chains=(Chain(0, (Stage(0, 0, 2, "127.0.0.1:41001"), Stage(1, 2, 4, "127.0.0.1:41002"))),))
FORGED_TOPOLOGY = Topology(model="/models/tiny", num_layers=4,
                           chains=(Chain(0, (Stage(0, 0, 2, "127.0.0.1:41001"), Stage(1, 2, 4, "10.6.6.6:666"))),))
REPLICAS = [ExpertReplica("expert-c0-e0", "127.0.0.1:41005", {1: [0, 1]}),
            ExpertReplica("expert-c0-e1", "127.0.0.1:41006", {1: [2, 3]})]
PARAMS = {"max_new_tokens": 8, "temperature": 0.0, "seed": 7, "stop_token_ids": []}


def _run(redis_url: str, body, deployment: str | None = None):
    """``body(store, raw, key)``: a signed store, a raw client (the attacker), the key of a name."""
    deployment = deployment or f"signed-{uuid.uuid4().hex[:8]}"

    async def main():
        raw = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        try:
            async with await Store.connect(redis_url, deployment, signer=Signer(KEY)) as store:
                return await body(store, raw, lambda *parts: ":".join(("stagemesh", deployment, *map(str, parts))))
        finally:
            await raw.aclose()

    return asyncio.run(main())


def test_a_forged_topology_is_refused_reported_and_the_last_good_copy_kept(redis_url, caplog):
    caplog.set_level(logging.ERROR, logger="stagemesh.mesh.signing")

    async def body(store: Store, raw, key):
        await store.set_topology(TOPOLOGY)
        assert await store.get_topology() == TOPOLOGY and await store.has_topology()
        await raw.set(key("topology"), FORGED_TOPOLOGY.to_json())  # the attack of issue 21
        assert await store.get_topology() == TOPOLOGY, "the last good copy"
        assert await store.get_topology() == TOPOLOGY
        assert not await store.has_topology(), "the gateway's keeper writes its own back"
        assert store.refusals.counts == {"topology": 1}, "counted once however often it is read"
        async with await Store.connect(store.url, store.deployment, signer=Signer(KEY)) as fresh:
            with pytest.raises(RefusedDocument, match=f"refused the topology at Redis key '{key('topology')}': "
                                                      "it is not signed"):
                await fresh.get_topology()  # a worker starting now has no good copy: it waits, then exits
            assert await fresh.set_topology_if_absent(TOPOLOGY), "a refused topology counts as absent"
            assert await fresh.get_topology() == TOPOLOGY
            assert not await fresh.set_topology_if_absent(FORGED_TOPOLOGY)

    _run(redis_url, body)
    assert any("refused the topology" in r.getMessage() for r in caplog.records)


def test_a_genuine_topology_of_another_deployment_or_key_is_refused(redis_url):
    async def body(store: Store, raw, key):
        other = Store(store._r, store.url, "other", Signer(KEY))  # same key, same Redis, another mesh
        await other.set_topology(FORGED_TOPOLOGY)
        await raw.set(key("topology"), await raw.get("stagemesh:other:topology"))
        with pytest.raises(RefusedDocument, match="does not match"):
            await store.get_topology()
        await Store(store._r, store.url, store.deployment, Signer(bytes(32))).set_topology(FORGED_TOPOLOGY)
        with pytest.raises(RefusedDocument, match="does not match"):
            await store.get_topology()
        assert store.refusals.counts == {"topology": 2}

    _run(redis_url, body)


def test_a_forged_placement_is_refused_and_the_stages_keep_routing_by_the_last_good_one(redis_url):
    forged = json.dumps({"replicas": [{"worker": "expert-c0-e0", "address": "10.6.6.6:666",
                                       "experts": {"1": [0, 1, 2, 3]}, "live": True}]})

    async def body(store: Store, raw, key):
        await store.set_placement(0, REPLICAS)
        assert await store.get_placement(0) == REPLICAS and await store.has_placement(0)
        await raw.set(key("placement", 0), forged)
        assert await store.get_placement(0) == REPLICAS
        assert not await store.has_placement(0)
        await store.set_placement(0, REPLICAS)
        await raw.set(key("placement", 1), await raw.get(key("placement", 0)))  # chain 0's, replayed as chain 1's
        with pytest.raises(RefusedDocument, match="placement:1'"):
            await store.get_placement(1)  # no good copy of chain 1's: the stage keeps the topology's
        assert store.refusals.counts == {"placement": 2}

    _run(redis_url, body)


def test_a_forged_registration_is_no_worker(redis_url):
    async def body(store: Store, raw, key):
        genuine = WorkerInfo("stage-c0-s0", "stage", chain=0, stage=0, start_layer=0, end_layer=2,
                             address="127.0.0.1:41001")
        await store.register_worker(genuine, ttl_s=30)
        fake = WorkerInfo("stage-c0-s9", "stage", chain=0, stage=9, address="10.6.6.6:666")
        await raw.set(key("worker", fake.worker_id), fake.to_json())
        await raw.sadd(key("workers"), fake.worker_id)
        await raw.set(key("alive", fake.worker_id), "1")
        # a genuine registration moved to another worker's slot
        await raw.set(key("worker", "stage-c0-s1"), await raw.get(key("worker", genuine.worker_id)))
        await raw.sadd(key("workers"), "stage-c0-s1")
        assert [w.worker_id for w in await store.list_workers()] == ["stage-c0-s0"]
        assert store.refusals.counts == {"worker": 2}

    _run(redis_url, body)


def test_the_journal_round_trips_signed_and_a_forged_or_altered_entry_is_refused(redis_url):
    async def body(store: Store, raw, key):
        await store.journal_open("r1", [1, 2, 3], PARAMS, chain=0)
        await store.journal_append_many({"r1": [101]})
        await store.journal_append_many({"r1": [102, 103]})
        await store.journal_move("r1", 1)
        assert await store.journal_get("r1") == JournalEntry("r1", (1, 2, 3), PARAMS, 1, (101, 102, 103))
        await store.journal_open("r1", [1, 2, 3], PARAMS, chain=1)  # reopened (a takeover): offsets start over
        await store.journal_append("r1", [101, 102])
        assert (await store.journal_get("r1")).token_ids == (101, 102)

        # a request nobody asked for, for a restarted gateway to take over
        await raw.hset(key("journal", "evil"), mapping={"prompt": "[666]", "params": json.dumps(PARAMS), "chain": 0})
        await raw.sadd(key("chain", 0, "requests"), "evil")
        assert await store.journal_get("evil") is None
        # r1's signed fields copied to another id
        await raw.hset(key("journal", "r2"), mapping=await raw.hgetall(key("journal", "r1")))
        assert await store.journal_get("r2") is None
        # r1's parameters altered (another temperature: other tokens after a failover)
        meta = await raw.hgetall(key("journal", "r1"))
        await raw.hset(key("journal", "r1"), "params", json.dumps({**PARAMS, "temperature": 2.0}))
        assert await store.journal_get("r1") is None
        await raw.hset(key("journal", "r1"), mapping=meta)
        assert (await store.journal_get("r1")).token_ids == (101, 102)
        # tokens appended by hand, then chunks swapped
        tokens = await raw.get(key("journal", "r1", "tokens"))
        await raw.append(key("journal", "r1", "tokens"), "666,")
        assert await store.journal_get("r1") is None
        await store.journal_append("r1", [103])
        first, second = (await raw.get(key("journal", "r1", "tokens"))).replace("666,", "").split(";")[:2]
        await raw.set(key("journal", "r1", "tokens"), f"{second};{first};")
        assert await store.journal_get("r1") is None
        assert tokens.startswith("101,102,#")
        assert store.refusals.counts == {"journal": 5}

    _run(redis_url, body)


def test_an_insecure_store_reads_signed_documents_and_a_signed_one_refuses_unsigned(redis_url):
    deployment = f"mixed-{uuid.uuid4().hex[:8]}"

    async def body(store: Store, raw, key):
        await store.set_topology(TOPOLOGY)
        await store.set_placement(0, REPLICAS)
        await store.journal_open("r1", [1], PARAMS, chain=0)
        await store.journal_append("r1", [5, 6])
        async with await Store.connect(store.url, deployment) as insecure:
            assert not insecure.signed
            assert await insecure.get_topology() == TOPOLOGY
            assert await insecure.get_placement(0) == REPLICAS
            assert (await insecure.journal_get("r1")).token_ids == (5, 6)
            await insecure.set_placement(0, REPLICAS[:1])
        with pytest.raises(RefusedDocument, match="not signed"):
            await Store(store._r, store.url, deployment, Signer(KEY)).get_placement(0)

    _run(redis_url, body, deployment)
