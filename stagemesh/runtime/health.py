"""The mesh's one ``grpc.health.v1`` client: does the server at an address answer SERVING?

``serving`` (async) and ``serving_sync`` (blocking: the launcher, ``stagemesh health``) open a
channel per check; ``HealthProbe`` keeps one per address for a watcher that checks the same
workers every second (the gateway); ``status`` is the bare call on a channel the caller holds.
Every check has a deadline: a server that does not answer in time is not serving. With a
``MeshTLS`` (``stagemesh.runtime.tls``) the checks go over the mesh's mTLS; None: plaintext.
``retry_after`` is how long every waiter (a stage for its next stage, the gateway for its
workers, a frontend for its gateway, the launcher for its frontends) sleeps between two checks.
"""

from __future__ import annotations

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.tls import MeshTLS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHECK_TIMEOUT_S = 1.0
FAST_RETRY_S = 0.05
"""How often a waiter checks a process that has not answered for less than ``FAST_FOR_S``."""
FAST_FOR_S = 30.0
"""How long a waiter keeps checking every ``FAST_RETRY_S`` before it slows to its own interval."""


def retry_after(waited_s: float, slow_s: float) -> float:
    """How long to sleep before checking again a process that has not answered SERVING for
    ``waited_s`` seconds: ``FAST_RETRY_S`` at first, ``slow_s`` once it has been ``FAST_FOR_S``.

    NOTE: processes start and restart in seconds (a stage loads in 2-10 s on CPU), and each wait
    in the chain of them (stage on stage, gateway on stages, frontend on gateway, launcher on
    frontends) added up to its own interval, 0.2-0.5 s, to a mesh's start and to a restarted
    worker's return. A check of a local port that refuses or answers costs about a millisecond;
    one that stays down for long is checked at the caller's slower interval."""
    return FAST_RETRY_S if waited_s < FAST_FOR_S else slow_s


def _check(channel: grpc.Channel | grpc.aio.Channel, service: str, timeout_s: float):
    """The ``Health.Check`` call: its reply on a blocking channel, an awaitable of it on an aio one."""
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)


def status_name(status: int) -> str:
    """``SERVING``, ``NOT_SERVING``, ... for a ``HealthCheckResponse.ServingStatus``."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


async def status(channel: grpc.aio.Channel, *, service: str = "", timeout_s: float = CHECK_TIMEOUT_S) -> int:
    """The ``ServingStatus`` the server behind ``channel`` reports for ``service`` ("" = the whole
    server); ``grpc.RpcError`` when it does not answer within ``timeout_s``."""
    return (await _check(channel, service, timeout_s)).status


async def serving(address: str, timeout_s: float = CHECK_TIMEOUT_S, tls: MeshTLS | None = None) -> bool:
    """Whether the server at ``address`` answers SERVING (service "") within ``timeout_s``."""
    async with mesh_tls.aio_channel(address, tls) as channel:
        try:
            return await status(channel, timeout_s=timeout_s) == SERVING
        except grpc.RpcError:
            return False


def serving_sync(address: str, timeout_s: float = CHECK_TIMEOUT_S, service: str = "",
                 tls: MeshTLS | None = None) -> bool:
    """``serving``, blocking; of ``service`` ("" : the server as a whole)."""
    with mesh_tls.channel(address, tls) as channel:
        try:
            return _check(channel, service, timeout_s).status == SERVING
        except grpc.RpcError:
            return False


def answers_sync(address: str, timeout_s: float = CHECK_TIMEOUT_S, tls: MeshTLS | None = None) -> bool:
    """Whether the server at ``address`` answers its health check at all, SERVING or not: it is alive
    (a liveness probe; a stage waiting on its next stage, or a gateway with no chain, is NOT_SERVING)."""
    with mesh_tls.channel(address, tls) as channel:
        try:
            _check(channel, "", timeout_s)
            return True
        except grpc.RpcError:
            return False


class HealthProbe:
    """Checks workers' health over one cached channel per address."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S, tls: MeshTLS | None = None):
        self.timeout_s = timeout_s
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def serving(self, address: str) -> bool:
        """Whether the worker at ``address`` answers SERVING within the timeout."""
        return await self.check(address) == SERVING

    async def answers(self, address: str) -> bool:
        """Whether it answers at all, SERVING or not (alive: ``answers_sync``)."""
        return await self.check(address) is not None

    async def check(self, address: str) -> int | None:
        """Its ``ServingStatus`` (service ""), None when it does not answer within the timeout."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = mesh_tls.aio_channel(address, self.tls)
        try:
            return await status(channel, timeout_s=self.timeout_s)
        except grpc.RpcError:
            # NOTE: a fresh channel next time: this one may sit in reconnect backoff long after the worker is back.
            del self._channels[address]
            await channel.close()
            return None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
