"""The gateway's chain watch (``gateway.chain_health.ChainWatch``) against a real Redis registry
and a real gRPC health server standing for a chain's one stage worker. The router is a recorder:
what is checked here is when the watch takes a chain out of service and puts it back."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field

import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc

from gateway.chain_health import INTERVAL_S, ChainWatch
from stagemesh.mesh.store import Store, WorkerInfo
from stagemesh.mesh.topology import Chain, Stage, Topology
from stagemesh.runtime.health import NOT_SERVING, SERVING, HealthProbe
from stagemesh.runtime.net import free_port
from tests.waiting import eventually

TRIALS = 6


@dataclass
class Handle:
    chain_id: int
    healthy: bool = True
    engine: object = None


@dataclass
class RecordingRouter:
    """``Router.fence`` / ``Router.revive`` as the watch calls them, each call's time recorded."""

    chains: list[Handle] = field(default_factory=lambda: [Handle(0)])
    fenced: list[float] = field(default_factory=list)
    revived: list[float] = field(default_factory=list)

    async def fence(self, handle: Handle, engine: object, why: str) -> None:
        handle.healthy = False
        self.fenced.append(time.monotonic())

    async def revive(self, handle: Handle) -> bool:
        handle.healthy = True
        self.revived.append(time.monotonic())
        return True


def test_a_chain_out_of_service_is_back_within_a_fast_retry_of_its_worker_serving(redis_url):
    """A worker that serves again puts its chain back at the watch's next check: every 50 ms while
    a chain is out (``retry_after``), not its ``INTERVAL_S`` (0.5 s) of a healthy mesh. Each trial
    waits a random time before serving again, so a watch that polled every 0.5 s would be found
    ~0.25 s late on average and at most 0.5 s; this one must be back within half that every time."""

    async def scenario() -> list[float]:
        port = free_port()
        address = f"127.0.0.1:{port}"
        servicer = health.aio.HealthServicer()
        await servicer.set("", SERVING)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(address)
        await server.start()
        store = await Store.connect(redis_url, f"chain-watch-{uuid.uuid4().hex[:8]}")
        await store.register_worker(WorkerInfo("stage-c0-s0", "stage", chain=0, stage=0, start_layer=0,
                                               end_layer=2, address=address), ttl_s=60.0)
        topology = Topology("/nowhere", num_layers=2, chains=(Chain(0, (Stage(0, 0, 2, address),)),))
        router, probe = RecordingRouter(), HealthProbe()
        watching = asyncio.create_task(ChainWatch(store, router, topology, probe).run())
        delays = []
        try:
            for trial in range(TRIALS):
                await servicer.set("", NOT_SERVING)
                assert await eventually(lambda: len(router.fenced) == trial + 1, timeout_s=10.0), "never fenced"
                await asyncio.sleep(random.uniform(0.05, INTERVAL_S))  # any moment between two slow checks
                await servicer.set("", SERVING)
                served = time.monotonic()
                assert await eventually(lambda: len(router.revived) == trial + 1, timeout_s=10.0), "never revived"
                delays.append(router.revived[-1] - served)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await probe.close()
            await store.close()
            await server.stop(None)
        return delays

    delays = asyncio.run(scenario())
    assert max(delays) < INTERVAL_S / 2, [round(d, 3) for d in delays]
