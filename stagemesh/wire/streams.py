"""The client side of ``Stage.Forward``: one long-lived stream to a stage worker (torch-free).

Both the gateway (to stage 0 of a chain) and a stage worker (to the next stage of its chain)
send every step down such a stream. A stage worker also reaches its expert workers' ``Expert.Run``
through the same class: any bidi RPC that answers every request once, in order, with a
``step_id`` on both sides (``StreamRpc`` says which RPC, and how a lost request is answered).

NOTE: the stage answers every request exactly once, in request order. So the stream keeps a
FIFO of (step id, future): a request is queued for the call and its future appended in the
same synchronous call, and each answer settles the oldest future (whose step id it must
carry). When the call breaks (the stage died or drained, the connection dropped, keepalive
found a hung host, the caller gave up on a step), every pending step is answered with
``failed_step_to_pb(step_id, unreachable(detail))`` and the next request opens a new call on
a fresh channel. The futures always get a ``StageResponse``, never an exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import grpc.aio

from stagemesh.errors import Unavailable
from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.tls import MeshTLS
from stagemesh.v1 import stage_pb2, stage_pb2_grpc
from stagemesh.wire.codec.messages import failed_step_to_pb

logger = logging.getLogger(__name__)

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
    # the reconnect backoff of the broken one: each stream gets its own.
    ("grpc.use_local_subchannel_pool", 1),
)

Unreachable = Callable[[str], Unavailable]
"""Builds the error of a broken stream from why it broke, e.g. ``stage c0-s1 at ADDR is unreachable: ...``."""


@dataclass(frozen=True)
class StreamRpc:
    """An ordered bidi RPC a ``ForwardStream`` can carry."""

    name: str
    """For messages, e.g. ``Forward``."""
    method: Callable[[grpc.aio.Channel], Any]
    """The stream-stream callable on a channel, e.g. ``StageStub(channel).Forward``."""
    failed: Callable[[int, Unavailable], Any]
    """The answer to a request of that step id that the broken stream will never answer."""


FORWARD = StreamRpc("Forward", lambda channel: stage_pb2_grpc.StageStub(channel).Forward, failed_step_to_pb)


class ForwardStream:
    """Sends ``StageRequest``s (or another ``rpc``'s requests) to ``address`` and hands back its answers, in order."""

    def __init__(self, address: str, unreachable: Unreachable, rpc: StreamRpc = FORWARD, *, tls: MeshTLS | None = None):
        self.address = address
        self.tls = tls
        """The mesh identity its calls are made with (mTLS); None: plaintext."""
        self._unreachable = unreachable
        self._rpc = rpc
        self._call: _ForwardCall | None = None
        self._readers: set[asyncio.Task] = set()  # broken calls' readers, kept until they end

    def send(self, request: stage_pb2.StageRequest) -> asyncio.Future[stage_pb2.StageResponse]:
        """Queue ``request``; the future gets the stage's answer, or an UNAVAILABLE one if the call breaks."""
        if self._call is None or self._call.broken:
            # NOTE: a fresh channel per call: an old one may sit in reconnect backoff for minutes.
            self._call = _ForwardCall(self.address, self._unreachable, self._rpc, self.tls)
            self._readers.add(self._call.reader)
            self._call.reader.add_done_callback(self._readers.discard)
        return self._call.send(request)

    def reset(self, detail: str) -> None:
        """Break the open call (its pending steps are answered UNAVAILABLE ``detail``); the next
        ``send`` opens a new one. For a caller that gave up waiting on a step."""
        if self._call is not None:
            self._call.close(detail)

    async def close(self, detail: str) -> None:
        """Break the open call and wait until every reader has closed its channel."""
        self.reset(detail)
        await asyncio.gather(*self._readers, return_exceptions=True)


class _ForwardCall:
    """One open ``Forward`` call: a request queue in, a reader task settling answers out."""

    def __init__(self, address: str, unreachable: Unreachable, rpc: StreamRpc, tls: MeshTLS | None):
        self.broken = False
        self._unreachable = unreachable
        self._rpc = rpc
        self._channel = mesh_tls.aio_channel(address, tls, CHANNEL_OPTIONS)
        self._outbox: asyncio.Queue[stage_pb2.StageRequest | None] = asyncio.Queue()
        self._pending: deque[tuple[int, asyncio.Future[stage_pb2.StageResponse]]] = deque()
        # NOTE: no deadline: the call lives as long as its process; keepalive guards it.
        self._call = rpc.method(self._channel)(self._requests())
        self.reader = asyncio.get_running_loop().create_task(self._read(), name=f"{rpc.name.lower()}-{address}")

    def send(self, request: stage_pb2.StageRequest) -> asyncio.Future[stage_pb2.StageResponse]:
        answer: asyncio.Future[stage_pb2.StageResponse] = asyncio.get_running_loop().create_future()
        self._pending.append((request.step_id, answer))
        self._outbox.put_nowait(request)
        return answer

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        detail = f"it ended the {self._rpc.name} stream"
        try:
            async for response in self._call:
                step_id, answer = self._pending.popleft() if self._pending else (None, None)
                if response.step_id != step_id:
                    if answer is not None:
                        self._pending.appendleft((step_id, answer))  # close() answers it
                    detail = f"it answered step {response.step_id} while step {step_id} was next"
                    return
                if not answer.done():  # done: whoever asked has stopped waiting
                    answer.set_result(response)
        except grpc.RpcError as err:
            detail = f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            detail = "the stream was closed on this side"
            raise
        finally:
            self.close(detail)
            await self._channel.close()

    def close(self, detail: str) -> None:
        """Answer every pending step with UNAVAILABLE and end the call."""
        if not self.broken:
            self.broken = True
            report = logger.warning if self._pending else logger.info
            report("%s; failing %d pending steps", self._unreachable(detail), len(self._pending))
            self._outbox.put_nowait(None)
            self._call.cancel()
        while self._pending:
            step_id, answer = self._pending.popleft()
            if not answer.done():
                answer.set_result(self._rpc.failed(step_id, self._unreachable(detail)))
