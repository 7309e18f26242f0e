"""The one health client (``stagemesh.runtime.health``) against a real gRPC server on an ephemeral port."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from stagemesh.runtime.health import (
    FAST_FOR_S,
    FAST_RETRY_S,
    NOT_SERVING,
    SERVING,
    HealthProbe,
    retry_after,
    serving,
    serving_sync,
    status,
    status_name,
)
from stagemesh.runtime.net import free_port

SERVICE = "test.Worker"


@pytest.fixture
def server():
    """A blocking gRPC server (its own threads) with only the health service; the test sets its statuses."""
    servicer = health.HealthServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    address = f"127.0.0.1:{free_port()}"
    grpc_server.add_insecure_port(address)
    grpc_server.start()
    yield address, servicer, grpc_server
    grpc_server.stop(None)


def _nobody() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("check", [serving_sync, lambda address: asyncio.run(serving(address))], ids=["sync", "async"])
def test_serving_follows_the_overall_status_and_is_false_when_nobody_answers(server, check):
    address, servicer, _ = server
    servicer.set("", NOT_SERVING)
    assert check(address) is False
    servicer.set("", SERVING)
    assert check(address) is True
    assert check(_nobody()) is False


def test_status_reads_one_service_name_and_raises_for_an_unknown_one(server):
    address, servicer, _ = server
    servicer.set(SERVICE, NOT_SERVING)

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            assert status_name(await status(channel, service=SERVICE)) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                await status(channel, service="no.Such")
            return err.value.code()

    assert asyncio.run(main()) == grpc.StatusCode.NOT_FOUND


def test_probe_keeps_one_channel_per_address_and_drops_it_when_the_worker_goes(server):
    address, servicer, grpc_server = server
    servicer.set("", SERVING)

    async def main():
        probe = HealthProbe(timeout_s=0.5)
        try:
            assert await probe.serving(address) and await probe.serving(address)
            kept = len(probe._channels)
            grpc_server.stop(None)
            gone = await probe.serving(address)
            return kept, gone, len(probe._channels)
        finally:
            await probe.close()

    assert asyncio.run(main()) == (1, False, 0)


def test_a_waiter_checks_often_at_first_and_at_its_own_interval_once_it_has_waited_long():
    assert retry_after(0.0, slow_s=0.5) == FAST_RETRY_S
    assert retry_after(FAST_FOR_S - 0.01, slow_s=0.5) == FAST_RETRY_S
    assert retry_after(FAST_FOR_S, slow_s=0.5) == 0.5
    assert retry_after(3600.0, slow_s=0.25) == 0.25
