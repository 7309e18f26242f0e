"""Data that flows between the scheduler, the step loop and a chain of stages.

Plain frozen dataclasses, torch-free: the gateway builds them, the codec puts them on the
wire, stage runners read them. ``SamplingParams`` and ``SampleSpec`` are declared in
``serving.params`` (everything about a sampling parameter is derived there) and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable

from stagemesh.errors import InvalidArgument
from stagemesh.serving.params import SampleSpec, SamplingParams

__all__ = [
    "SamplingParams", "Request", "SampleSpec", "PENDING_TOKEN", "SeqChunk", "seq_chunk", "StepPlan", "TokenLogprobs",
    "StepResult", "TokenEvent", "token_event",
]


@dataclass(frozen=True)
class Request:
    """One generation request, already tokenized and validated."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0
    resume_token_ids: tuple[int, ...] = ()
    """Tokens already generated (and streamed) before a failover; they are re-prefilled, not re-emitted."""


PENDING_TOKEN = -1
"""A decode chunk's token id that stands for the token being sampled for the sequence in an
older step still in flight (overlap scheduling): the chain's first stage fills it in."""


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: new tokens to run at positions ``start ...``."""

    seq_id: int
    start: int
    """Tokens of this sequence already in every stage's KV cache (the position of token_ids[0])."""
    token_ids: tuple[int, ...]
    sample: SampleSpec | None = None
    """Set when the last stage samples a token after this chunk (last prefill chunk, or decode)."""

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    def filled(self, step_id: int, token_of: Callable[[int], int]) -> SeqChunk:
        """This chunk with its ``PENDING_TOKEN`` replaced by ``token_of(seq_id)``, if it has one."""
        if PENDING_TOKEN not in self.token_ids:
            return self
        if len(self.token_ids) != 1:
            raise InvalidArgument(
                f"step {step_id}: sequence {self.seq_id} has a pending token ({PENDING_TOKEN}) in a chunk of "
                f"{len(self.token_ids)}; only a one-token chunk may have one (overlap scheduling)"
            )
        return replace(self, token_ids=(token_of(self.seq_id),))


def seq_chunk(seq_id: int, start: int, token_ids: tuple[int, ...], sample: SampleSpec | None) -> SeqChunk:
    """``SeqChunk(seq_id, start, token_ids, sample)``, without the frozen dataclass's ``__init__``.

    NOTE: one is built per row per step, by the gateway's scheduler and by every stage decoding
    the plan; the frozen ``__init__`` (an ``object.__setattr__`` per field) costs 1.4 µs, filling
    the instance's ``__dict__`` 0.55 µs (one core). ``SeqChunk`` has no ``__post_init__``; as
    for ``serving.params.spec_from_fields``, nothing is skipped but the setattr calls."""
    chunk = object.__new__(SeqChunk)
    chunk.__dict__.update(seq_id=seq_id, start=start, token_ids=token_ids, sample=sample)
    return chunk


@dataclass(frozen=True)
class StepPlan:
    """One micro-batch: what every stage of a chain runs in one step."""

    step_id: int
    chunks: tuple[SeqChunk, ...]
    free: tuple[int, ...] = ()
    """Sequence ids whose KV cache every stage frees before running this step."""
    epoch: int = 0
    """The gateway incarnation that sent it (stamped on the wire by ``gateway.chain_client``; 0
    in one process): a stage that sees a newer one drops the older one's sequences first."""

    @cached_property
    def num_tokens(self) -> int:
        """Tokens of every chunk: worked out once per plan (the gateway and each stage read it
        several times a step; a frozen plan's chunks never change)."""
        return sum([len(c.token_ids) for c in self.chunks])

    def fill_pending(self, token_of: Callable[[int], int]) -> StepPlan:
        """This plan with each ``PENDING_TOKEN`` replaced by ``token_of(seq_id)``: the token
        sampled for that sequence in an older step (overlap scheduling). The plan itself when
        it has none; InvalidArgument when one is in a chunk of several tokens."""
        if not any(PENDING_TOKEN in c.token_ids for c in self.chunks):
            return self
        return replace(self, chunks=tuple(c.filled(self.step_id, token_of) for c in self.chunks))


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probabilities of one generated token under the model's own distribution
    (log_softmax of the last stage's logits, before temperature, top-k, top-p and min-p)."""

    logprob: float | None
    """The generated token's; None when it is not known (a token generated before a gateway
    restart: the journal keeps token ids only)."""
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the ``top_logprobs`` most likely tokens, most likely first."""


@dataclass(frozen=True)
class StepResult:
    """What the last stage sends back for one step: one sampled token per sampling chunk."""

    step_id: int
    tokens: dict[int, int] = field(default_factory=dict)
    """seq_id -> sampled token id."""
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    """seq_id -> its token's log-probabilities, for the chunks whose ``SampleSpec.logprobs`` is set."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request, or its end."""

    request_id: str
    token_id: int | None
    """None only on an event that just carries the end (e.g. cancellation)."""
    index: int
    """Position of this token among the request's generated tokens (0-based)."""
    finish_reason: str | None = None
    """``stop`` (EOS or a stop id), ``length`` (max_new_tokens or context), or None while running."""
    logprobs: TokenLogprobs | None = None
    """The token's log-probabilities, when its request asked for them (``SamplingParams.logprobs``)."""


def token_event(request_id: str, token_id: int | None, index: int, finish_reason: str | None = None,
                logprobs: TokenLogprobs | None = None) -> TokenEvent:
    """``TokenEvent(...)`` without the frozen dataclass's ``__init__``: one per token on the
    scheduler's step path (the same NOTE as ``seq_chunk``)."""
    event = object.__new__(TokenEvent)
    event.__dict__.update(request_id=request_id, token_id=token_id, index=index, finish_reason=finish_reason,
                          logprobs=logprobs)
    return event
