"""Request validation: every refusal is an ``InvalidArgument`` that says what to fix."""

from __future__ import annotations

import math
from collections.abc import Sequence

from stagemesh.errors import InvalidArgument
from stagemesh.serving.types import SamplingParams

MAX_SEED = 2**63


def validate_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
) -> None:
    """Raise ``InvalidArgument`` naming the bad value and the constraint, or return None."""
    _validate_prompt(prompt_token_ids, vocab_size=vocab_size, max_model_len=max_model_len)
    _validate_params(params, vocab_size=vocab_size)


def _validate_prompt(prompt: Sequence[int], *, vocab_size: int, max_model_len: int) -> None:
    if len(prompt) == 0:
        raise InvalidArgument("the prompt is empty; send at least one token (or non-empty text)")
    for pos, tok in enumerate(prompt):
        if not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise InvalidArgument(
                f"prompt token id {tok!r} at position {pos} is outside the vocabulary [0, {vocab_size})"
            )
    if len(prompt) >= max_model_len:
        raise InvalidArgument(
            f"prompt has {len(prompt)} tokens but the model's context is {max_model_len} tokens; shorten it"
        )


def _validate_params(p: SamplingParams, *, vocab_size: int) -> None:
    if p.max_new_tokens <= 0:
        raise InvalidArgument(f"max_new_tokens={p.max_new_tokens} must be > 0")
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise InvalidArgument(f"temperature={p.temperature} must be a finite number >= 0 (0 is greedy)")
    if p.top_k < 0:
        raise InvalidArgument(f"top_k={p.top_k} must be >= 0 (0 turns it off)")
    if not 0 < p.top_p <= 1:  # also refuses nan: every comparison with nan is False
        raise InvalidArgument(f"top_p={p.top_p} must be in (0, 1] (1 turns it off)")
    if p.seed is not None and not 0 <= p.seed < MAX_SEED:
        raise InvalidArgument(f"seed={p.seed} must be in [0, 2**63)")
    for tok in p.stop_token_ids:
        if not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise InvalidArgument(f"stop token id {tok!r} is outside the vocabulary [0, {vocab_size})")


def validate_text_prompt(text: str) -> None:
    """A text prompt must have some text before it is tokenized (a BOS alone is no prompt)."""
    if not text or not text.strip():
        raise InvalidArgument("prompt is empty; send some text or a non-empty token_ids list")
