"""What a ``PENDING_TOKEN`` stands for on the first stage of a longer chain: the token the last
stage sampled for that sequence in an older step, as its answer comes back through this stage.

NOTE: overlap scheduling on a chain of several stages. The gateway sends a lookahead step
before the older step's tokens have reached it (see the scheduler's NOTE). The first stage
relays every answer of the stages after it, so it sees those tokens first: ``expect`` marks
the sequences a step samples as coming, ``land`` records the answer, and ``fill`` (on the step
thread, before the step runs) waits for each pending token and writes it into the request.
The request then goes on, filled in, to the next stages and, on a tensor-parallel stage, to
the other ranks.

A token whose step failed is filled in as 0. Its sequence is failed at the gateway by that
same answer, so this chunk's token is dropped there and its KV freed; failing the whole
lookahead step instead would also fail the other sequences in it.
"""

from __future__ import annotations

import threading
import time
from array import array

from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.serving.types import PENDING_TOKEN
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import pack_int64, unpack_int64

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

    def expect(self, request: stage_pb2.StageRequest) -> None:
        """The step is about to run: its sampling sequences' tokens are coming with its answer."""
        sampled = [seq for seq, sample in zip(request.seq_ids, request.sample) if sample]
        with self._changed:
            for seq in request.free:
                self._tokens.pop(seq, None)
            for seq in sampled:
                self._tokens[seq] = _COMING
            self._steps[request.step_id] = sampled

    def land(self, response: stage_pb2.StageResponse) -> None:
        """A step's answer (its tokens, or its error) came back."""
        with self._changed:
            sampled = self._steps.pop(response.step_id, None)
            if sampled is None:
                return
            if response.HasField("error"):
                landed = {seq: _FAILED for seq in sampled}
            else:
                landed = dict(zip(response.seq_ids, response.tokens))
            for seq in sampled:  # a sequence freed meanwhile stays forgotten
                if seq in self._tokens:
                    self._tokens[seq] = landed.get(seq, _FAILED)
            self._changed.notify_all()

    def fill(self, request: stage_pb2.StageRequest) -> None:
        """Replace each ``PENDING_TOKEN`` of ``request`` by its sequence's token, waiting for it."""
        try:
            token_ids = unpack_int64(request.token_ids) if request.HasField("token_ids") else array("q")
        except ValueError as err:
            raise InvalidArgument(f"stage {self._name}: malformed StageRequest {request.step_id}: {err}") from err
        if PENDING_TOKEN not in token_ids:
            return
        deadline = time.monotonic() + self._timeout_s
        offset = 0
        for seq, length in zip(request.seq_ids, request.lengths):
            if PENDING_TOKEN in token_ids[offset : offset + length]:
                if length != 1:
                    raise InvalidArgument(
                        f"step {request.step_id}: sequence {seq} has a pending token ({PENDING_TOKEN}) in a "
                        f"chunk of {length}; only a one-token chunk may have one (overlap scheduling)"
                    )
                token_ids[offset] = self._wait(request.step_id, seq, deadline)
            offset += length
        request.token_ids.CopyFrom(pack_int64(token_ids))

    def _wait(self, step_id: int, seq: int, deadline: float) -> int:
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

    def fail(self, request: stage_pb2.StageRequest) -> None:
        """The step failed on this stage: the tokens it samples will never come (the gateway
        fails its sequences). Called whether or not ``expect`` was."""
        with self._changed:
            self._steps.pop(request.step_id, None)
            for seq, sample in zip(request.seq_ids, request.sample):
                if sample:
                    self._tokens[seq] = _FAILED
            self._changed.notify_all()
