"""Data that flows between the scheduler, the step loop and a chain of stages.

Plain frozen dataclasses, torch-free: the gateway builds them, the codec puts them on the
wire, stage runners read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 16
    """Tokens to generate at most (fewer when the model's context ends first)."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); above 0 samples from softmax(logits / T)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 turns it off."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probabilities add up to p; in (0, 1]."""
    seed: int | None = None
    """Seed of the request's random stream; the same seed gives the same tokens on any layout."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after emitting one of these (as well as the model's EOS ids)."""
    ignore_eos: bool = False
    """Do not stop at the model's EOS ids (benchmarks use this for fixed output lengths)."""


@dataclass(frozen=True)
class Request:
    """One generation request, already tokenized and validated."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0
    resume_token_ids: tuple[int, ...] = ()
    """Tokens already generated (and streamed) before a failover; they are re-prefilled, not re-emitted."""


@dataclass(frozen=True)
class SampleSpec:
    """What the last stage needs to sample one sequence's next token."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    index: int
    """Tokens the sequence has generated so far: the counter into its seeded random stream."""


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


@dataclass(frozen=True)
class StepPlan:
    """One micro-batch: what every stage of a chain runs in one step."""

    step_id: int
    chunks: tuple[SeqChunk, ...]
    free: tuple[int, ...] = ()
    """Sequence ids whose KV cache every stage frees before running this step."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class StepResult:
    """What the last stage sends back for one step: one sampled token per sampling chunk."""

    step_id: int
    tokens: dict[int, int] = field(default_factory=dict)
    """seq_id -> sampled token id."""


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
