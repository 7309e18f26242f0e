"""A chain of remote stage workers behind the engine's ``Chain`` interface.

NOTE: every step of a chain goes down ONE long-lived ``Stage.Forward`` stream to stage 0
(``stagemesh.wire.streams``); stage 0 relays through the other stages and the answers come
back in request order. When the stream breaks (the stage died, the connection dropped,
keepalive found a hung host, or a step stayed unanswered for ``step_timeout_s``), every
pending step fails with ``UNAVAILABLE: stage c{C}-s0 at ADDR is unreachable: ...`` and the
next step opens a new stream on a fresh channel, after a backoff (``RETRY_BACKOFF_S``).
"""

from __future__ import annotations

import asyncio

from stagemesh.errors import Unavailable
from stagemesh.serving.types import StepPlan, StepResult
from stagemesh.wire.codec.messages import plan_to_pb, result_from_pb
from stagemesh.wire.streams import ForwardStream

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
        self._stream = ForwardStream(address, self._unreachable)
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
        answer = self._stream.send(plan_to_pb(plan))
        try:
            response = await asyncio.wait_for(asyncio.shield(answer), self.step_timeout_s)
        except asyncio.TimeoutError:
            self._stream.reset(f"it did not answer step {plan.step_id} within {self.step_timeout_s:.0f} s")
            response = answer.result()  # the UNAVAILABLE answer that reset() just gave it
        return result_from_pb(response)

    def _unreachable(self, detail: str) -> Unavailable:
        return Unavailable(f"stage c{self.chain}-s0 at {self.address} is unreachable: {detail}")

    async def close(self, why: str = "the gateway is shutting down") -> None:
        """End the stream; its pending steps are answered UNAVAILABLE ``why``."""
        await self._stream.close(why)
