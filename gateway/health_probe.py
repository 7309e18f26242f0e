"""The gateway's grpc.health.v1 client for the workers it watches."""

from __future__ import annotations

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthProbe:
    """Checks workers' health over one cached channel per address."""

    def __init__(self, timeout_s: float = 1.0):
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def serving(self, address: str) -> bool:
        """Whether the worker at ``address`` answers SERVING within the timeout."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
        except grpc.RpcError:
            # NOTE: a fresh channel next time: this one may sit in reconnect backoff long after the worker is back.
            del self._channels[address]
            await channel.close()
            return False
        return reply.status == SERVING

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
