"""A chain of remote stage workers behind the engine's ``Chain`` interface.

NOTE: every step of a chain goes down ONE long-lived ``Stage.Forward`` stream to stage 0
(``stagemesh.wire.streams``); stage 0 relays through the other stages and the answers come
back in request order. When the stream breaks (the stage died, the connection dropped,
keepalive found a hung host, or a step stayed unanswered past its deadline), every pending
step fails with ``UNAVAILABLE: stage c{C}-s0 at ADDR is unreachable: ...`` and the next step
opens a new stream on a fresh channel, after a backoff (``RETRY_BACKOFF_S``). The engine then
fails those steps' requests and the router moves them to another chain (``gateway.failover``).

NOTE: the step deadline. A frozen worker anywhere in the chain (SIGSTOP, a TP rank > 0 stuck
so that rank 0's collective never returns) keeps every socket open and its health checks may
still pass, so only a deadline finds it. Answers come back in order, so a step cannot be
answered before the step sent ahead of it: its wait starts when it is sent or when the step
ahead was answered, whichever is later, and is measured against ``STEP_DEADLINE``, which
follows the chain's measured step time (``stagemesh.runtime.faults.Deadline``). A step that
overstays it breaks the stream as above.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from stagemesh.errors import Unavailable
from stagemesh.runtime.deadline import Deadline, DeadlinePolicy
from stagemesh.runtime.tls import MeshTLS
from stagemesh.serving.types import StepPlan, StepResult
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import plan_to_pb, result_from_pb
from stagemesh.wire.streams import ForwardStream

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.05, 2.0)
"""After a step failed as UNAVAILABLE (stream broken, or a later stage down), the next steps
wait this long (first, doubling up to the longest) until one succeeds: the engine retries the
KV frees of failed steps at once, and a dead stage must not turn that into a hot loop."""
STEP_DEADLINE = DeadlinePolicy(floor_s=2.0, multiple=3.0, first_s=60.0, ceiling_s=120.0)
"""How long a step may wait for its answer (see the module NOTE and ``stagemesh.runtime.faults``).

NOTE: measured on the 2-core CI VM, tiny test models on CPU, dp=2, 16-32 greedy streams: a
step's wait is 8-40 ms at p50 and 30-150 ms at p99 on a quiet VM (the slowest of 650 healthy
steps: 0.19 s), and the p99 reached 0.4 s while other work loaded the cores. So 2 s + 3 × p99
allows 2.1-3.2 s: ten times the slowest healthy wait seen, above the ~1.3 s a step takes when
a frozen expert worker's rows are re-sent (``stage_worker.remote_experts``), and under the 5 s
a micro-batch may wait on a frozen process up to a p99 of 1 s. Steps are scaled by their
tokens over the largest step measured lately, so a long prefill chunk gets its own allowance.
Until 8 steps are measured a step gets 60 s (warm-up: on a GPU the first steps also initialise
CUDA and pick kernels); no step ever gets more than the 120 s of before."""
DEADLINE_LOG_CHANGE = 2.0
"""The deadline is logged when it moved by this factor since it was last logged."""


class RemoteChain:
    """``Chain.step`` over a ``Stage.Forward`` stream to stage 0 of chain ``chain`` at ``address``."""

    def __init__(self, chain: int, address: str, *, epoch: int = 0, deadline: Deadline | None = None,
                 clock: Callable[[], float] = time.monotonic, tls: MeshTLS | None = None):
        self.chain = chain
        self.address = address
        self.epoch = epoch
        """This gateway's incarnation, stamped on every step (``StageRequest.epoch``)."""
        self.deadline = deadline if deadline is not None else Deadline(STEP_DEADLINE)
        """The step deadline; pass the previous client's to a renewed one to keep its measurements."""
        self._clock = clock
        self._stream = ForwardStream(address, self._unreachable, tls=tls)
        self._ahead: asyncio.Future[stage_pb2.StageResponse] | None = None
        """The answer of the last step sent: the next step's wait starts once it is in."""
        self._logged_limit = 0.0
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
        msg = plan_to_pb(plan)
        msg.epoch = self.epoch
        answer = self._stream.send(msg)
        ahead, self._ahead = self._ahead, answer
        limit = self.deadline.limit(plan.num_tokens)
        if ahead is not None and not ahead.done():
            # its own deadline bounds this wait (when it overstays, the reset answers both);
            # ``limit`` only guards against a step ahead whose waiter was cancelled
            await asyncio.wait([ahead], timeout=limit)
        return result_from_pb(await self._wait(plan, answer, limit))

    async def _wait(self, plan: StepPlan, answer: asyncio.Future, limit: float) -> stage_pb2.StageResponse:
        """The answer, or UNAVAILABLE (the stream reset) once it overstayed ``limit``; healthy
        answers feed the deadline."""
        start = self._clock()
        try:
            response = await asyncio.wait_for(asyncio.shield(answer), limit)
        except asyncio.TimeoutError:
            self._stream.reset(f"it did not answer step {plan.step_id} within {limit:.2f} s "
                               f"(deadline from its step time: {self.deadline.describe()})")
            return answer.result()  # the UNAVAILABLE answer that reset() just gave it
        # NOTE: a step without tokens (only KV frees: the first step of a returning chain) may
        # have waited for a backlog left by the outage; its wait says nothing of the step time.
        if not response.HasField("error") and plan.num_tokens:
            self.deadline.observe(self._clock() - start, plan.num_tokens)
            self._log_limit()
        return response

    def _log_limit(self) -> None:
        if self.deadline.measured < self.deadline.policy.min_samples:
            return
        limit = self.deadline.limit(0)
        if not self._logged_limit or max(limit / self._logged_limit, self._logged_limit / limit) >= DEADLINE_LOG_CHANGE:
            logger.info("chain %d: step deadline now %.2f s (%s)", self.chain, limit, self.deadline.describe())
            self._logged_limit = limit

    def _unreachable(self, detail: str) -> Unavailable:
        return Unavailable(f"stage c{self.chain}-s0 at {self.address} is unreachable: {detail}")

    async def close(self, why: str = "the gateway is shutting down") -> None:
        """End the stream; its pending steps are answered UNAVAILABLE ``why``."""
        await self._stream.close(why)
