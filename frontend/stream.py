"""One client's request as a frontend holds it: the tokens the gateway sent so far, and its end.

NOTE: a stream interval that adapts (vLLM's and SGLang's ``--stream-interval``, without a
fixed interval that would delay a lone stream). The link appends tokens as each step's
``EventBatch`` arrives and wakes the client's writer; the writer sends everything that arrived
since its last message in ONE ``GenerateResponse``. A gRPC message costs the frontend ~40 µs of
CPU whatever it carries (py-spy: most of it in gRPC's C core), so with many streams the
``Pacer`` wakes writers on one timer instead of at every step: the frontend sends at most
``messages_per_s`` messages a second in all, and each of N streams gets one message every
N / messages_per_s seconds (capped), carrying every token of that time. One stream, or a few,
wait for nothing; a request's first token and its end are never held back.
"""

from __future__ import annotations

import asyncio
from array import array

from stagemesh.errors import StagemeshError
from stagemesh.serving.params import SamplingParams
from stagemesh.serving.types import TokenLogprobs

MESSAGES_PER_S = 4000.0
"""The frontend's message budget: ~16% of a core at ~40 µs a message."""
MAX_GAP_S = 0.05
"""The longest a busy frontend holds a stream's tokens back."""
MIN_GAP_S = 0.001
"""Shorter gaps are not worth a timer: the next step's tokens come about as soon."""


class Wake:
    """``asyncio.Event``'s set / clear / is_set / wait for ONE waiter, the stream's writer.

    NOTE: the frontend waits on a stream's wake once per client message, and ``Event.wait``
    looks its loop up and queues a future each time: ~4% of a busy frontend's samples (py-spy,
    128 streams; Python 3.11 checks the pid on every running-loop lookup). This keeps the loop
    from the first wait and at most one future."""

    __slots__ = ("_set", "_waiter", "_loop")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        if self._waiter is not None:
            raise RuntimeError("a stream's wake has one waiter, its writer")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class RequestStream:
    """Tokens in, chunks out; filled by ``frontend.link``, read by the client's handler."""

    __slots__ = ("handle", "request_id", "prompt", "params", "tokens", "logprobs", "sent", "finish_reason", "error",
                 "final", "wake")

    def __init__(self, handle: int, request_id: str, prompt: array | None = None, params: SamplingParams | None = None,
                 sent: int = 0):
        self.handle = handle
        """The request's number on the link to the gateway."""
        self.request_id = request_id
        self.prompt, self.params = prompt, params
        """What the request was submitted with: a new gateway is sent them again (``link``)."""
        self.tokens: list[int] = []
        """Every token received, in order (from index 0, also after a resume)."""
        self.logprobs: list[TokenLogprobs | None] | None = [] if params is not None and params.logprobs else None
        """With ``params.logprobs``: one per token of ``tokens`` (None: not known, a token the
        gateway sent again after a restart); None when the request did not ask."""
        self.sent = sent
        """Tokens the client has: handed to it, or had before it resumed here."""
        self.finish_reason: str | None = None
        self.error: StagemeshError | None = None
        self.final = True
        """The error is the mesh's verdict on the request (its client should not resume it), not
        this frontend's loss of the gateway or its shutdown (resuming elsewhere may help)."""
        self.wake = Wake()
        """Set when tokens, the finish or an error came."""

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def finish(self, reason: str) -> None:
        if not self.ended:
            self.finish_reason = reason
            self._end()

    def fail(self, err: StagemeshError, *, final: bool = True) -> None:
        if not self.ended:
            self.error, self.final = err, final
            self._end()

    def _end(self) -> None:
        self.wake.set()  # an end is never held back

    async def next_tokens(self) -> tuple[int, list[int]]:
        """Waits for news; (index of the first new token, the new tokens). After the last
        tokens, ``ended`` says why the stream ends."""
        await self.wake.wait()
        self.wake.clear()
        index = self.sent
        if len(self.tokens) <= index:  # a resume re-sends from index 0: the client has these
            return index, []
        self.sent = len(self.tokens)
        return index, self.tokens[index:]

    def add(self, token: int, logprobs: TokenLogprobs | None) -> None:
        """A token from the gateway (the link calls this), with its log-probabilities if any."""
        self.tokens.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)

    def restart(self) -> None:
        """The gateway sends every token again from index 0 (a resume); ``sent`` stays."""
        self.tokens = []
        if self.logprobs is not None:
            self.logprobs = []

    def logprobs_of(self, index: int, count: int) -> list[TokenLogprobs | None]:
        """The log-probabilities of tokens ``index ..`` (``count`` of them), as ``next_tokens``
        handed them out; [] when the request did not ask."""
        return [] if self.logprobs is None else self.logprobs[index:index + count]


class Pacer:
    """Wakes the writers of streams with new tokens: at once when the frontend has few streams,
    else all together once per ``gap()`` (one timer for every stream, not one per message)."""

    def __init__(self, open_streams, messages_per_s: float = MESSAGES_PER_S, max_gap_s: float = MAX_GAP_S):
        self._open = open_streams
        """Returns how many streams the frontend has open."""
        self.messages_per_s, self.max_gap_s = messages_per_s, max_gap_s
        self._held: set[RequestStream] = set()
        self._holding = asyncio.Event()
        self._task: asyncio.Task | None = None

    def gap(self) -> float:
        if self.messages_per_s <= 0:
            return 0.0
        gap = min(self.max_gap_s, self._open() / self.messages_per_s)
        return gap if gap >= MIN_GAP_S else 0.0

    def wake(self, streams: set[RequestStream]) -> None:
        """These streams have new tokens: wake their writers now, or at the next tick."""
        if not self.gap():
            for stream in streams:
                stream.wake.set()
            return
        for stream in streams:
            if stream.sent == 0:  # a first token goes out at once (time to first token)
                stream.wake.set()
            else:
                self._held.add(stream)
        if self._held:
            self._holding.set()
            if self._task is None:
                self._task = asyncio.create_task(self._tick(), name="stream-pacer")

    async def _tick(self) -> None:
        while True:
            await self._holding.wait()
            await asyncio.sleep(self.gap())
            self._holding.clear()
            held, self._held = self._held, set()
            for stream in held:
                stream.wake.set()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
