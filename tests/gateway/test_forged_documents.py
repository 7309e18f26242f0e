"""The gateway against forged documents in Redis (a signed store, a raw client as the attacker):
its keeper writes its own topology and placement back within a tick, and its status, /healthz
body and metrics say what was refused."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from types import SimpleNamespace

import redis.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keeper import StoreKeeper
from gateway.mesh_collector import MeshCollector, Snapshot
from gateway.status import ALERT_S, StatusReporter
from stagemesh.mesh.placement import chain_replicas
from stagemesh.mesh.signing import Forged, Refusals, Signer
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Chain, ExpertWorker, Stage, Topology

KEY = bytes(range(32))
TOPOLOGY = Topology(model="/nowhere", num_layers=2, chains=(Chain(
    0, (Stage(0, 0, 2, "127.0.0.1:41001"),), (ExpertWorker(0, "127.0.0.1:41005", experts={0: (0, 1)}),)),))


def test_the_keeper_writes_back_a_forged_topology_and_a_forged_placement_within_a_tick(redis_url):
    deployment = f"forged-{uuid.uuid4().hex[:8]}"
    prefix = f"stagemesh:{deployment}"

    async def scenario():
        raw = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        async with await Store.connect(redis_url, deployment, signer=Signer(KEY)) as store:
            async def rewrite_placement():
                await store.set_placement(0, chain_replicas(TOPOLOGY.chains[0]))

            await store.set_topology(TOPOLOGY)
            await rewrite_placement()
            keeper = StoreKeeper(store, TOPOLOGY, rewrite_placement, dict, interval_s=0.1)
            assert await keeper.tick() is None
            genuine = await raw.get(f"{prefix}:placement:0")
            forged = json.dumps({"replicas": [{"worker": "expert-c0-e0", "address": "10.6.6.6:666",
                                               "experts": {"0": [0, 1]}, "live": True}]})
            await raw.set(f"{prefix}:placement:0", forged)
            placement_why = await keeper.tick()
            placement_after = await raw.get(f"{prefix}:placement:0")
            await raw.set(f"{prefix}:topology", TOPOLOGY.to_json().replace("41001", "666"))
            topology_why = await keeper.tick()
            again = await keeper.tick()
            await raw.aclose()
            return (placement_why, placement_after == genuine, topology_why, await store.get_topology(), again,
                    dict(store.refusals.counts))

    placement_why, restored, topology_why, topology, again, refused = asyncio.run(scenario())
    assert placement_why == "an expert placement is gone or refused (forged)" and restored
    assert topology_why.startswith("the topology is gone") and "refused (forged)" in topology_why
    assert topology == TOPOLOGY and again is None
    assert refused == {"placement": 1, "topology": 1}


def _store_with(refusals: Refusals, signed: bool = True) -> SimpleNamespace:
    return SimpleNamespace(refusals=refusals, signed=signed, deployment="d")


def test_the_status_reads_degraded_for_a_while_after_a_refusal():
    refusals = Refusals()
    status = StatusReporter(_store_with(refusals), SimpleNamespace(chains=[]), TOPOLOGY)
    assert status.alert() is None
    refusals.refuse("placement", "stagemesh:d:placement:0", "forged", Forged("it is not signed"))
    alert = status.alert()
    assert alert.startswith("refused 1 forged document(s) in Redis, the last a placement at 'stagemesh:d:placement:0'")
    assert "it is not signed" in alert
    assert status.alert(now=time.time() + ALERT_S + 1) is None
    doc = status._gateway()
    assert doc["alert"] == alert and doc["documents"]["signed"] is True
    assert doc["documents"]["counts"] == {"placement": 1}


def test_the_refusals_are_a_prometheus_counter_by_kind():
    registry = CollectorRegistry()
    collector = MeshCollector()
    registry.register(collector)
    collector.snapshot = Snapshot(signed=True, refused={"placement": 2})
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert [s.value for s in families["stagemesh_documents_signed"].samples] == [1.0]
    counts = {s.labels["kind"]: s.value for s in families["stagemesh_refused_documents"].samples
              if s.name == "stagemesh_refused_documents_total"}
    assert counts == {"topology": 0.0, "placement": 2.0, "worker": 0.0, "journal": 0.0}
