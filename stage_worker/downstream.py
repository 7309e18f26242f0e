"""The link from a stage to the next stage of its chain: one long-lived ``Stage.Forward`` stream.

The stream (``stagemesh.wire.streams``) answers every request exactly once, in order; when
it breaks, each pending step is answered ``UNAVAILABLE: stage c{C}-s{S} at ADDR is
unreachable: ...``, which this stage relays upstream like any other answer.
"""

from __future__ import annotations

import asyncio

from stagemesh.errors import Unavailable
from stagemesh.runtime.tls import MeshTLS
from stagemesh.v1 import stage_pb2
from stagemesh.wire.streams import ForwardStream


class DownstreamLink:
    """Sends this stage's outputs to the next stage and routes the answers back, in order."""

    def __init__(self, address: str, name: str, tls: MeshTLS | None = None):
        self.address = address
        self.name = name
        """The next stage's name in messages, e.g. ``c0-s1``."""
        self._stream = ForwardStream(address, self._unreachable, tls=tls)

    def send(self, request: stage_pb2.StageRequest, answer: asyncio.Future) -> asyncio.Future[stage_pb2.StageResponse]:
        """Queue ``request`` for the next stage; ``answer`` gets its response (or an error one),
        which the returned future also gets."""
        reply = self._stream.send(request)
        reply.add_done_callback(lambda done: _relay(done, answer))
        return reply

    def _unreachable(self, detail: str) -> Unavailable:
        return Unavailable(f"stage {self.name} at {self.address} is unreachable: {detail}")

    async def close(self) -> None:
        await self._stream.close("this stage is shutting down")


def _relay(reply: asyncio.Future[stage_pb2.StageResponse], answer: asyncio.Future) -> None:
    if not answer.done():  # done: the upstream stream that asked has gone
        answer.set_result(reply.result())
