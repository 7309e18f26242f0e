"""What a ``PENDING_TOKEN`` stands for on the first stage of a longer chain: the token the last
stage sampled for that sequence in an older step, as its answer comes back through this stage.

NOTE: overlap scheduling on a chain of several stages. The gateway sends a lookahead step
before the older step's tokens have reached it (see the scheduler's NOTE). The first stage
relays every answer of the stages after it, so it sees those tokens first: ``expect`` marks
the sequences a step samples as coming, ``land`` records the answer, and ``fill`` (on the step
thread, before the step runs) waits for each pending token and fills it into the step's plan
(``StepPlan.fill_pending``, the one fill there is). The plan then goes on, filled in, to the
next stages and, on a tensor-parallel stage, to the other ranks.

A token whose step failed is filled in as 0. Its sequence is failed at the gateway by that
same answer, so this chunk's token is dropped there and its KV freed; failing the whole
lookahead step instead would also fail the other sequences in it.
"""

from __future__ import annotations

import threading
import time
from functools import partial

from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.serving.types import StepPlan

FILL_TIMEOUT_S = 120.0
"""The longest a step waits for a pending token. Every forwarded step is answered (a broken
stream answers UNAVAILABLE, keepalive finds a hung host in 30 s), so this is only a backstop."""

_COMING = object()
_FAILED = object()


class SampledTokens:
    """The last token sampled for each sequence that this stage has run a sampling chunk of."""

    def __init__(self, name: str, timeout_s: float = FILL_TIMEOUT_S):
        self._name = name
        self._timeout_s = timeout_s
        self._changed = threading.Condition()
        self._tokens: dict[int, object] = {}
        """seq id -> its last token, ``_COMING`` or ``_FAILED``."""
        self._steps: dict[int, list[int]] = {}
        """Step id -> the sequences it samples, until its answer lands."""

    def expect(self, plan: StepPlan) -> None:
        """The step is about to run: its sampling sequences' tokens are coming with its answer."""
        sampled = [c.seq_id for c in plan.chunks if c.sample is not None]
        with self._changed:
            for seq in plan.free:
                self._tokens.pop(seq, None)
            for seq in sampled:
                self._tokens[seq] = _COMING
            self._steps[plan.step_id] = sampled

    def land(self, step_id: int, tokens: dict[int, int] | None) -> None:
        """A step's answer came back: its tokens (seq id -> token), or None when it failed."""
        with self._changed:
            sampled = self._steps.pop(step_id, None)
            if sampled is None:
                return
            for seq in sampled:  # a sequence freed meanwhile stays forgotten
                if seq in self._tokens:
                    self._tokens[seq] = _FAILED if tokens is None else tokens.get(seq, _FAILED)
            self._changed.notify_all()

    def fill(self, plan: StepPlan) -> StepPlan:
        """``plan`` with each ``PENDING_TOKEN`` replaced by its sequence's token, waiting for it."""
        deadline = time.monotonic() + self._timeout_s
        return plan.fill_pending(partial(self._wait, plan.step_id, deadline))

    def _wait(self, step_id: int, deadline: float, seq: int) -> int:
        with self._changed:
            while (token := self._tokens.get(seq)) is _COMING:
                if not self._changed.wait(deadline - time.monotonic()) and time.monotonic() >= deadline:
                    raise Unavailable(
                        f"step {step_id}: stage {self._name} waited {self._timeout_s:g} s for the token of "
                        f"sequence {seq} from the stages after it; none came"
                    )
        if token is None:
            raise InvalidArgument(
                f"step {step_id}: sequence {seq} asks for the token sampled for it before, and no step "
                f"through stage {self._name} has sampled one for it"
            )
        return 0 if token is _FAILED else token

    def fail(self, plan: StepPlan) -> None:
        """The step failed on this stage: the tokens it samples will never come (the gateway
        fails its sequences). Called whether or not ``expect`` was."""
        with self._changed:
            self._steps.pop(plan.step_id, None)
            for c in plan.chunks:
                if c.sample is not None:
                    self._tokens[c.seq_id] = _FAILED
            self._changed.notify_all()
