"""What the SDK hands back: plain frozen dataclasses, no grpc or protobuf types."""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.serving.types import TokenLogprobs

__all__ = ["GeneratedToken", "GenerateResult", "TokenLogprobs"]


@dataclass(frozen=True)
class GeneratedToken:
    """One token of a streamed generation, or (``token_id`` None) a final item that only ends it."""

    request_id: str
    token_id: int | None
    """None only on an item that just carries the end or trailing text."""
    text: str
    """Text this token adds to the output ("" without a tokenizer, or mid-character)."""
    index: int
    """Position of this token among the request's generated tokens (0-based)."""
    finish_reason: str | None = None
    """``stop`` (EOS or a stop id) or ``length`` on the last item; None while running."""
    logprobs: TokenLogprobs | None = None
    """With ``logprobs=True``: the token's log-probability under the model's own distribution
    (before temperature and the top-k/top-p/min-p filters) and, with ``top_logprobs=K``, the K
    most likely tokens' (token id, log-probability), most likely first. Its ``logprob`` is None
    for a token generated before a gateway restart (the journal keeps token ids only).
    None when the call did not ask."""


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation."""

    request_id: str
    token_ids: tuple[int, ...]
    """The generated tokens (the prompt not included)."""
    text: str
    """Their text, when the model has a tokenizer; "" otherwise."""
    finish_reason: str | None
    """``stop`` or ``length``; None only if the stream ended without saying why."""
    logprobs: tuple[TokenLogprobs, ...] | None = None
    """With ``logprobs=True``: one per token of ``token_ids`` (see ``GeneratedToken.logprobs``);
    None when the call did not ask."""
