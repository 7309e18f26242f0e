"""An overload wave against a real mesh: 2,000 streams opened at once (gRPC's core would cancel
calls past 1,000 not yet picked up) against a chain that runs 16 and queues 64. What the mesh
cannot take is refused RESOURCE_EXHAUSTED with a retry hint, nothing gets a bare CANCELLED, no
process dies, and the KV cache is back to empty after the wave.
"""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import grpc.aio
import pytest

from stagemesh import AsyncClient
from stagemesh.errors import StagemeshError
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.chaos.chaos_helpers import status
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import stagemesh_up

pytestmark = pytest.mark.slow

WAVE, MAX_NEW = 2000, 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama2"), num_layers=2)


async def wave(addr: str) -> tuple[collections.Counter, dict, dict]:
    """The wave on 20 clients (connections); mid-wave, one raw call to read a refusal's trailers."""
    outcomes, messages = collections.Counter(), {}
    clients = [AsyncClient(addr, timeout=300) for _ in range(20)]

    async def one(i: int) -> None:
        try:
            await clients[i % 20].generate(token_ids=[3, 4, i % 200 + 2], max_new_tokens=MAX_NEW, ignore_eos=True)
            outcomes["OK"] += 1
        except StagemeshError as err:
            outcomes[err.code] += 1
            messages.setdefault(err.code, err.message)

    async def refused_trailers() -> dict:
        """The trailers of the first raw call refused RESOURCE_EXHAUSTED, out of calls sent every 50 ms
        while the wave arrives (each on its own: an admitted one waits for its turn, which may outlast
        the wave's refusals)."""
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            async def probe(delay_s: float) -> dict | None:
                await asyncio.sleep(delay_s)
                call = stub.Generate(gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[5, 6]),
                                                                 params={"max_new_tokens": 2}))
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        return dict(err.trailing_metadata() or ())
                return None

            refused = [t for t in await asyncio.gather(*(probe(0.05 * i) for i in range(200))) if t is not None]
        return refused[0] if refused else {}

    try:
        trailers, *_ = await asyncio.gather(refused_trailers(), *(one(i) for i in range(WAVE)))
    finally:
        for client in clients:
            await client.close()
    return outcomes, messages, trailers


def settled(addr: str, within_s: float = 10.0) -> dict:
    """The status once every stage's published KV use is back to 0 (figures lag a heartbeat)."""
    deadline = time.monotonic() + within_s
    while True:
        doc = status(addr)
        stages = [w for w in doc["workers"] if w["role"] == "stage"]
        if all(w["load"]["kv_blocks_used"] == 0 for w in stages) or time.monotonic() > deadline:
            return doc
        time.sleep(0.5)


def test_an_overload_wave_is_refused_with_a_retry_hint_never_cancelled_and_leaves_nothing_behind(model_dir, tmp_path):
    args = ("--max-num-seqs", "16", "--max-waiting", "64")
    with stagemesh_up(model_dir, tmp_path / "logs", *args) as (addr, _, proc):
        outcomes, messages, trailers = asyncio.run(wave(addr))
        after = settled(addr)
        assert proc.poll() is None  # nothing died
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, (outcomes, messages)
    assert outcomes["OK"] >= 80 and outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes
    assert "queue full" in messages["RESOURCE_EXHAUSTED"] and "retry" in messages["RESOURCE_EXHAUSTED"]
    assert trailers.get("grpc-retry-pushback-ms") == "1000", trailers
    stages = [w for w in after["workers"] if w["role"] == "stage"]
    assert stages and all(w["load"]["kv_blocks_used"] == 0 for w in stages), stages
    assert all(c["healthy"] for c in after["chains"])
    print(f"overload wave of {WAVE}: {dict(outcomes)}")
