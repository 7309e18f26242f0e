"""One client's request as a frontend holds it: the tokens the gateway sent so far, and its end.

NOTE: a stream interval that adapts. The link appends tokens as each step's ``EventBatch``
arrives and wakes the client's writer; the writer sends everything that arrived since its last
message in ONE ``GenerateResponse``. A client that keeps up gets one token per message; one
that falls behind (a slow reader, a busy frontend) gets several per message, so the cost of a
message is shared by more tokens exactly when it matters (vLLM's and SGLang's stream interval,
without a fixed interval that would delay a lone stream).
"""

from __future__ import annotations

import asyncio

from stagemesh.errors import StagemeshError


class RequestStream:
    """Tokens in, chunks out; filled by ``frontend.link``, read by the client's handler."""

    __slots__ = ("handle", "request_id", "tokens", "sent", "finish_reason", "error", "wake", "chain")

    def __init__(self, handle: int, request_id: str):
        self.handle = handle
        """The request's number on the link to the gateway."""
        self.request_id = request_id
        self.tokens: list[int] = []
        """Every token received, in order."""
        self.sent = 0
        """Tokens already handed to the client."""
        self.finish_reason: str | None = None
        self.error: StagemeshError | None = None
        self.wake = asyncio.Event()
        """Set when tokens, the finish or an error came."""
        self.chain: int | None = None
        """The chain it runs on (the gateway says on admission and after a failover)."""

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.wake.set()

    def fail(self, err: StagemeshError) -> None:
        if not self.ended:
            self.error = err
            self.wake.set()

    async def next_tokens(self) -> tuple[int, list[int]]:
        """Waits for news; (index of the first new token, the new tokens). After the last
        tokens, ``ended`` says why the stream ends."""
        await self.wake.wait()
        self.wake.clear()
        index, self.sent = self.sent, len(self.tokens)
        return index, self.tokens[index:]
