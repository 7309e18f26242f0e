"""The link from a stage to the next stage of its chain: one long-lived ``Stage.Forward`` stream.

NOTE: the next stage answers every request exactly once, in request order. So the link keeps
a FIFO of (step id, future): a request is queued for the stream and its future appended in
the same synchronous call, and each answer settles the oldest future (whose step id it must
carry). When the stream breaks (the next stage died or drained, the connection dropped,
keepalive found a hung host), every pending step is answered with ``UNAVAILABLE: stage
c{C}-s{S} at ADDR is unreachable: ...`` and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable

import grpc
import grpc.aio

from stagemesh.codec.messages import failed_step_to_pb
from stagemesh.errors import Unavailable
from stagemesh.v1 import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 2**20
"""A micro-batch of activations: tokens × hidden_size × dtype bytes, with room to spare."""
MESSAGE_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
CHANNEL_OPTIONS = (
    *MESSAGE_OPTIONS,
    # A hung host (no RST) is found by HTTP/2 pings: no ack within the timeout breaks the stream.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Channels of one process share subchannels by default, so a new channel would inherit
    # the reconnect backoff of the broken one: each link stream gets its own.
    ("grpc.use_local_subchannel_pool", 1),
)


class DownstreamLink:
    """Sends this stage's outputs to the next stage and routes the answers back, in order."""

    def __init__(self, address: str, name: str):
        self.address = address
        self.name = name
        """The next stage's name in messages, e.g. ``c0-s1``."""
        self._stream: _Stream | None = None
        self._readers: set[asyncio.Task] = set()  # keeps broken streams' readers alive until they end

    def send(self, request: stage_pb2.StageRequest, answer: asyncio.Future) -> None:
        """Queue ``request`` for the next stage; ``answer`` gets its response (or an error one)."""
        if self._stream is None or self._stream.broken:
            # NOTE: a fresh channel per stream: an old one may sit in reconnect backoff for minutes.
            self._stream = _Stream(self.address, self._unreachable)
            self._readers.add(self._stream.reader)
            self._stream.reader.add_done_callback(self._readers.discard)
        self._stream.send(request, answer)

    def _unreachable(self, detail: str) -> Unavailable:
        return Unavailable(f"stage {self.name} at {self.address} is unreachable: {detail}")

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close("this stage is shutting down")


class _Stream:
    """One open ``Forward`` call: a request queue in, a reader task settling answers out."""

    def __init__(self, address: str, unreachable: Callable[[str], Unavailable]):
        self.broken = False
        self._unreachable = unreachable
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._outbox: asyncio.Queue[stage_pb2.StageRequest | None] = asyncio.Queue()
        self._pending: deque[tuple[int, asyncio.Future]] = deque()
        # NOTE: no deadline: the stream lives as long as the worker; keepalive guards it.
        self._call = stage_pb2_grpc.StageStub(self._channel).Forward(self._requests())
        self.reader = asyncio.get_running_loop().create_task(self._read(), name=f"downstream-{address}")

    def send(self, request: stage_pb2.StageRequest, answer: asyncio.Future) -> None:
        self._pending.append((request.step_id, answer))
        self._outbox.put_nowait(request)

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        detail = "it ended the Forward stream"
        try:
            async for response in self._call:
                step_id, answer = self._pending.popleft() if self._pending else (None, None)
                if response.step_id != step_id:
                    if answer is not None:
                        self._pending.appendleft((step_id, answer))  # _break answers it
                    detail = f"it answered step {response.step_id} while step {step_id} was next"
                    return
                if not answer.done():  # done: the upstream stream that asked has gone
                    answer.set_result(response)
        except grpc.RpcError as err:
            detail = f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            detail = "this stage closed the link"
            raise
        finally:
            self._break(detail)
            await self._channel.close()

    def _break(self, detail: str) -> None:
        """Answer every pending step with UNAVAILABLE and end the call; the link opens a new one."""
        if not self.broken:
            self.broken = True
            report = log.warning if self._pending else log.info
            report("%s; failing %d pending steps", self._unreachable(detail), len(self._pending))
            self._outbox.put_nowait(None)
            self._call.cancel()
        while self._pending:
            step_id, answer = self._pending.popleft()
            if not answer.done():
                answer.set_result(failed_step_to_pb(step_id, self._unreachable(detail)))

    async def close(self, detail: str) -> None:
        self.reader.cancel()
        self._break(detail)
        await self._channel.close()
