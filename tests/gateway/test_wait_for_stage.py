"""The gateway's wait for a stage worker (``gateway.chain_setup.wait_for_stage``) against a real gRPC
server that starts listening only after the wait began, as a stage does while it loads.

gRPC puts a channel that found its port closed in reconnect backoff (1 s at first, ±20%, then
1.6× longer each time), so a wait that kept one channel found a stage up to seconds after it
served; each attempt now dials afresh."""

from __future__ import annotations

import asyncio
import time

import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc

from gateway.chain_setup import wait_for_stage
from stagemesh.runtime.health import FAST_RETRY_S, NOT_SERVING, SERVING
from stagemesh.runtime.net import free_port
from stagemesh.v1 import stage_pb2, stage_pb2_grpc

LATE_S = 1.3
"""When the stage starts listening: after the first reconnect of a kept channel (0.8-1.2 s) and
before its next (2.1-3.1 s)."""


class LoadedStage(stage_pb2_grpc.StageServicer):
    async def Info(self, request, context):
        return stage_pb2.StageInfo(chain=0, stage=1, block_size=16, num_kv_blocks=64)


async def _stage_serving_late(port: int, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    await asyncio.sleep(LATE_S)
    server = grpc.aio.server()
    stage_pb2_grpc.add_StageServicer_to_server(LoadedStage(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def test_a_stage_that_starts_listening_late_is_found_as_soon_as_it_serves():
    async def scenario():
        port = free_port()
        servicer = health.aio.HealthServicer()
        await servicer.set("", NOT_SERVING)  # listening, still loading
        waiting = asyncio.create_task(wait_for_stage(f"127.0.0.1:{port}"))
        server = await _stage_serving_late(port, servicer)
        try:
            await asyncio.sleep(0.3)
            assert not waiting.done(), "NOT_SERVING is not ready"
            await servicer.set("", SERVING)
            served = time.monotonic()
            info = await asyncio.wait_for(waiting, timeout=10.0)
            return info, time.monotonic() - served
        finally:
            await server.stop(None)

    info, after_s = asyncio.run(scenario())
    assert (info.chain, info.stage, info.num_kv_blocks) == (0, 1, 64)
    # A few retry intervals, far below gRPC's reconnect backoff that a kept channel would wait out.
    assert after_s < 10 * FAST_RETRY_S, after_s
