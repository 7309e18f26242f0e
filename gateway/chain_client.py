"""A chain of remote stage workers behind the engine's ``Chain`` interface.

NOTE: every step of a chain goes down ONE long-lived ``Stage.Forward`` stream to stage 0;
stage 0 relays through the other stages and the answers come back in request order, one per
request. So the client keeps a FIFO of pending futures: a request is queued for the stream
and its future appended in the same synchronous call, and each answer settles the oldest
future (whose step id it must carry). When the stream breaks (the stage died, the connection
dropped, keepalive found a hung host, or a step stayed unanswered for ``step_timeout_s``),
every pending step fails with ``UNAVAILABLE: stage c{C}-s0 at ADDR is unreachable: ...`` and
the next step opens a new stream on a fresh channel, after a backoff (``RETRY_BACKOFF_S``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc
import grpc.aio

from stagemesh.codec.messages import plan_to_pb, result_from_pb
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.serving.types import StepPlan, StepResult
from stagemesh.v1 import stage_pb2, stage_pb2_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 2**20
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A hung host (no RST) is found by HTTP/2 pings: no ack within the timeout breaks the stream.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)
RETRY_BACKOFF_S = (0.05, 2.0)
"""After a step failed as UNAVAILABLE (stream broken, or a later stage down), the next steps
wait this long (first, doubling up to the longest) until one succeeds: the engine retries the
KV frees of failed steps at once, and a dead stage must not turn that into a hot loop."""
DEFAULT_STEP_TIMEOUT_S = 120.0
"""One micro-batch (a decode token, or a prefill chunk within the token budget) never takes this
long on a healthy chain; a long generation is many steps, so this never cuts one short."""


class RemoteChain:
    """``Chain.step`` over a ``Stage.Forward`` stream to stage 0 of chain ``chain`` at ``address``."""

    def __init__(self, chain: int, address: str, *, step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        self.chain = chain
        self.address = address
        self.step_timeout_s = step_timeout_s
        self._stream: _Stream | None = None
        self._readers: set[asyncio.Task] = set()  # broken streams' readers, kept until they end
        self._failures = 0
        """Steps failed as UNAVAILABLE in a row: the exponent of the retry backoff."""

    async def step(self, plan: StepPlan) -> StepResult:
        """Send ``plan`` down the stream and wait for its answer (StagemeshError if it failed)."""
        if self._failures:
            first, longest = RETRY_BACKOFF_S
            await asyncio.sleep(min(longest, first * 2 ** (self._failures - 1)))
        try:
            result = await self._send(plan)
        except Unavailable:
            self._failures += 1
            raise
        self._failures = 0
        return result

    async def _send(self, plan: StepPlan) -> StepResult:
        stream = self._open_stream()
        future = stream.submit(plan)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.step_timeout_s)
        except asyncio.TimeoutError:
            stream.close(f"it did not answer step {plan.step_id} within {self.step_timeout_s:.0f} s")
            return await future  # raises the Unavailable that close() just set

    def _open_stream(self) -> _Stream:
        if self._stream is None or self._stream.broken:
            # NOTE: a fresh channel per stream: an old one may sit in reconnect backoff for minutes.
            self._stream = _Stream(self.address, self._unreachable)
            self._readers.add(self._stream.reader)
            self._stream.reader.add_done_callback(self._readers.discard)
        return self._stream

    def _unreachable(self, detail: str) -> Unavailable:
        return Unavailable(f"stage c{self.chain}-s0 at {self.address} is unreachable: {detail}")

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close("the gateway is shutting down")
        await asyncio.gather(*self._readers, return_exceptions=True)


class _Stream:
    """One open ``Forward`` call: a request queue in, a reader task settling answers out."""

    def __init__(self, address: str, unreachable):
        self.broken = False
        self._unreachable = unreachable
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._outbox: asyncio.Queue[stage_pb2.StageRequest | None] = asyncio.Queue()
        self._pending: deque[tuple[int, asyncio.Future[StepResult]]] = deque()
        # NOTE: no deadline: the stream lives as long as the gateway; keepalive guards it.
        self._call = stage_pb2_grpc.StageStub(self._channel).Forward(self._requests())
        self.reader = asyncio.get_running_loop().create_task(self._read(), name=f"forward-{address}")

    def submit(self, plan: StepPlan) -> asyncio.Future[StepResult]:
        """Queue ``plan``; the future settles with its answer, or an error when the stream breaks."""
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self._pending.append((plan.step_id, future))
        self._outbox.put_nowait(plan_to_pb(plan))
        return future

    async def _requests(self):
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        detail = "it ended the Forward stream"
        try:
            async for response in self._call:
                step_id, future = self._pending.popleft() if self._pending else (None, None)
                if response.step_id != step_id:
                    detail = f"it answered step {response.step_id} while step {step_id} was next"
                    return
                _settle(future, response)
        except grpc.RpcError as err:
            detail = f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            detail = "the gateway closed the stream"
            raise
        finally:
            self.close(detail)
            await self._channel.close()

    def close(self, detail: str) -> None:
        """Fail every pending step with UNAVAILABLE and end the call; the chain opens a new one."""
        if not self.broken:
            self.broken = True
            error = self._unreachable(detail)
            if self._pending:
                logger.warning("%s; failing %d pending steps", error.message, len(self._pending))
            self._outbox.put_nowait(None)
            self._call.cancel()
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                error = self._unreachable(detail)  # one object per waiter: they raise in different tasks
                future.set_exception(error)


def _settle(future: asyncio.Future[StepResult], response: stage_pb2.StageResponse) -> None:
    if future.done():  # nobody waits for it any more
        return
    try:
        future.set_result(result_from_pb(response))
    except (StagemeshError, ValueError) as err:
        future.set_exception(err)


def _consume(future: asyncio.Future) -> None:
    """Mark the error as seen: a step the engine stopped waiting for must not log 'never retrieved'."""
    if not future.cancelled():
        future.exception()
