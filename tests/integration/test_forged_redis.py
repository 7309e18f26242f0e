"""Issue 21's Redis attacks against a real signed mesh (`stagemesh up --pp 2 --ep 2`, whose
protections are on by default: the mesh key made for the run): an attacker who can write to Redis
(the test's raw client, with the Redis password but not the mesh key) writes a fake topology, a
fake expert placement, a fake worker registration and a fake journal entry, again and again,
while 16 greedy streams run. Every stream gives the tokens of
the fault-free run, and the gateway's status, /healthz and /metrics say what it refused."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest
import redis

from stagemesh import Client
from stagemesh.deploy.redis_server import free_port
from stagemesh.mesh.signing import RefusedDocument, load_signer, split
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Topology
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import generate_all, stagemesh_up

pytestmark = pytest.mark.slow

ATTACKER = "127.0.0.1:9"
"""Where the forged documents send the mesh's traffic (the discard port: nothing answers)."""


class Attacker(threading.Thread):
    """Writes the forged documents straight into Redis every 20 ms until stopped."""

    def __init__(self, redis_url: str, deployment: str):
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.p = f"stagemesh:{deployment}"
        self.stop = threading.Event()
        self.writes = 0

    def forged(self) -> dict[str, str]:
        genuine = Topology.from_json(split(self.r.get(f"{self.p}:topology"))[0])
        topology = genuine.to_json()
        for stage in (s for c in genuine.chains for s in c.stages):
            topology = topology.replace(stage.address, ATTACKER)
        placement = json.loads(split(self.r.get(f"{self.p}:placement:0"))[0])
        for replica in placement["replicas"]:  # every expert's rows to one worker, which holds half of them
            replica["address"] = placement["replicas"][0]["address"]
            replica["experts"] = {layer: [0, 1, 2, 3] for layer in replica["experts"]}
        worker = {"worker_id": "stage-c0-s9", "role": "stage", "chain": 0, "stage": 9, "start_layer": 0,
                  "end_layer": 4, "experts": {}, "address": ATTACKER, "pid": 1, "device": "cpu", "tp_size": 1,
                  "started_at": time.time()}
        return {"topology": topology, "placement:0": json.dumps(placement), "worker:stage-c0-s9": json.dumps(worker)}

    def run(self) -> None:
        docs = self.forged()
        self.r.sadd(f"{self.p}:workers", "stage-c0-s9")
        self.r.hset(f"{self.p}:journal:evil", mapping={"prompt": "[5, 6, 7]", "chain": 0,
                                                       "params": json.dumps({"max_new_tokens": 1000})})
        self.r.sadd(f"{self.p}:chain:0:requests", "evil")
        while not self.stop.wait(0.02):
            for key, text in docs.items():
                self.r.set(f"{self.p}:{key}", text)
            self.writes += 1


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _refused(addr: str) -> dict:
    with Client(addr) as client:
        return client.status()["gateway"]["documents"]


def test_forged_topology_placement_and_registration_change_no_token_and_are_reported(tmp_path):
    model = make_hf_checkpoint("mixtral", tmp_path / "mixtral", num_layers=4)
    deployment, http_port = "default", free_port()
    requests = [{"token_ids": [2 + (7 * i + j) % 300 for j in range(3 + i % 5)], "max_new_tokens": 24,
                 "ignore_eos": True} for i in range(16)]
    args = ("--pp", "2", "--ep", "2", "--http-port", str(http_port))
    with stagemesh_up(model, tmp_path / "logs", *args) as (addr, redis_url, up):
        tls_dir = up.tls_dir  # the run's, made by `stagemesh up`
        fault_free = [list(r.token_ids) for r in asyncio.run(generate_all(addr, requests))]
        assert _refused(addr) == {"signed": True, "counts": {}, "total": 0, "last": None}
        assert _http(http_port, "/healthz") == (200, "ok\n")

        attacker = Attacker(redis_url, deployment)
        attacker.start()
        try:
            deadline = time.monotonic() + 10
            while not {"topology", "placement", "worker"} <= set(_refused(addr)["counts"]):  # the keeper: every second
                assert time.monotonic() < deadline, _refused(addr)
                time.sleep(0.2)
            attacked = [list(r.token_ids) for r in asyncio.run(generate_all(addr, requests))]
        finally:
            attacker.stop.set()
            attacker.join()
        with Client(addr) as client:
            status = client.status()
        healthz, metrics = _http(http_port, "/healthz"), _http(http_port, "/metrics")[1]
        signed, evil = _restored(redis_url, deployment, tls_dir, attacker)

    assert attacker.writes > 20
    assert not evil, "the keeper's rebuild (after the forged topology) closed the forged journal entry"
    assert not isinstance(signed, RefusedDocument), f"the keeper never wrote its own documents back: {signed}"
    assert attacked == fault_free, "a forged document changed the tokens"
    assert "stage-c0-s9" not in {f"stage-c{w['chain']}-s{w['stage']}" for w in status["workers"]}
    assert ATTACKER not in {w["address"] for w in status["workers"]}
    documents = status["gateway"]["documents"]
    assert documents["signed"] and documents["counts"]["topology"] >= 1 and documents["counts"]["placement"] >= 1
    assert status["gateway"]["alert"].startswith("refused ")
    assert healthz[0] == 200 and healthz[1].startswith("degraded: refused "), healthz
    assert 'stagemesh_refused_documents_total{kind="placement"}' in metrics
    assert "stagemesh_documents_signed 1.0" in metrics
    stage_logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("stage*.log"))
    assert "refused the placement at Redis key" in stage_logs, "the stages met the forged placement and refused it"
    topology, placement = signed
    assert ATTACKER not in topology.to_json() and {r.address for r in placement} == {
        w.address for c in topology.chains for w in c.expert_workers}


def _restored(redis_url: str, deployment: str, tls_dir, attacker: Attacker, timeout_s: float = 15.0) -> tuple:
    """(what ``_read_signed`` reads, whether the forged journal entry is still in Redis), once the keeper
    (every second; a loaded machine delays it) has written its own documents back over the forged ones
    and the forged entry is gone, or as last read after ``timeout_s``; a refused document reads as the
    ``RefusedDocument``, since a fresh reader has no good copy of it to fall back on."""
    deadline = time.monotonic() + timeout_s
    while True:
        evil = attacker.r.exists(f"stagemesh:{deployment}:journal:evil")
        try:
            signed = asyncio.run(_read_signed(redis_url, deployment, tls_dir))
        except RefusedDocument as err:
            signed = err
        if (not evil and not isinstance(signed, RefusedDocument)) or time.monotonic() > deadline:
            return signed, evil
        time.sleep(0.2)


async def _read_signed(redis_url: str, deployment: str, tls_dir) -> tuple:
    """The topology and chain 0's placement as a fresh reader with the mesh key finds them."""
    async with await Store.connect(redis_url, deployment, signer=load_signer(tls_dir)) as store:
        return await store.get_topology(), await store.get_placement(0)
