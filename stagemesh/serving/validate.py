"""Request validation: every refusal is an ``InvalidArgument`` that says what to fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from stagemesh.errors import InvalidArgument
from stagemesh.serving.params import DEFAULTS, KINDS, PARAMS, Bounds, SamplingParams, param_of


def validate_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
    resume_token_ids: Sequence[int] = (),
) -> None:
    """Raise ``InvalidArgument`` naming the bad value and the constraint, or return None.
    ``resume_token_ids``: tokens a resumed request already has, which must fit with the prompt."""
    _validate_prompt(prompt_token_ids, vocab_size=vocab_size, max_model_len=max_model_len)
    _validate_params(params, vocab_size=vocab_size)
    validate_room(len(prompt_token_ids), params.max_new_tokens, max_model_len)
    if resume_token_ids:
        _validate_resumed(resume_token_ids, len(prompt_token_ids), vocab_size=vocab_size, max_model_len=max_model_len)


def _validate_resumed(tokens: Sequence[int], num_prompt: int, *, vocab_size: int, max_model_len: int) -> None:
    if num_prompt + len(tokens) > max_model_len:
        raise InvalidArgument(f"a resume with {len(tokens)} known tokens after a {num_prompt}-token prompt "
                              f"passes the model's context of {max_model_len} tokens")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(f"known token id {bad!r} of a resume is outside the vocabulary [0, {vocab_size})")


def _validate_prompt(prompt: Sequence[int], *, vocab_size: int, max_model_len: int) -> None:
    if len(prompt) == 0:
        raise InvalidArgument("the prompt is empty; send at least one token (or non-empty text)")
    # the length first: a huge prompt is refused without a pass over its ids
    validate_prompt_length(len(prompt), max_model_len)
    for pos, tok in enumerate(prompt):
        if not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise InvalidArgument(
                f"prompt token id {tok!r} at position {pos} is outside the vocabulary [0, {vocab_size})"
            )


def validate_prompt_length(num_tokens: int, max_model_len: int) -> None:
    """InvalidArgument when a prompt of ``num_tokens`` leaves no room in the context."""
    if num_tokens >= max_model_len:
        raise InvalidArgument(
            f"prompt has {num_tokens} tokens and the model's context is {max_model_len} tokens; the prompt must "
            f"leave room for at least one new token: shorten it to at most {max_model_len - 1} tokens"
        )


def validate_room(num_prompt: int, max_new_tokens: int, max_model_len: int) -> None:
    """InvalidArgument when the prompt and ``max_new_tokens`` together pass the context.

    NOTE: refused, not cut at the context: a caller who asked for more than fits would
    otherwise get a ``length`` finish it cannot tell from its own limit (as vLLM refuses)."""
    if num_prompt + max_new_tokens > max_model_len:
        raise InvalidArgument(
            f"max_new_tokens={max_new_tokens} after a {num_prompt}-token prompt asks for "
            f"{num_prompt + max_new_tokens} tokens, but the model's context is {max_model_len}; "
            f"lower max_new_tokens to at most {max_model_len - num_prompt} (or shorten the prompt)"
        )


def _validate_params(p: SamplingParams, *, vocab_size: int) -> None:
    for f in PARAMS:
        _validate_value(f.name, getattr(p, f.name), param_of(f).bounds)
    for tok in p.stop_token_ids:
        if not 0 <= tok < vocab_size:
            raise InvalidArgument(f"stop token id {tok!r} is outside the vocabulary [0, {vocab_size})")
    if p.top_logprobs and not p.logprobs:
        raise InvalidArgument(f"top_logprobs={p.top_logprobs} needs logprobs=true (the top tokens come with the "
                              "generated token's own log-probability)")


def _validate_value(name: str, value: Any, bounds: Bounds | None) -> None:
    """One field: its type (None only where the default is None), then its bounds."""
    kind = KINDS[name]
    if value is None and DEFAULTS[name] is None:
        return
    if not _is_a(value, kind):
        raise InvalidArgument(f"{name}={value!r} must be {_KIND_NAMES[kind]}")
    finite = kind is float and bounds is not None and bounds.high is None
    if bounds is None or (value in bounds and (not finite or math.isfinite(value))):
        return
    note = f" ({bounds.note})" if bounds.note else ""
    raise InvalidArgument(f"{name}={value} must be {'a finite number ' if finite else ''}{bounds}{note}")


def _is_a(value: Any, kind: type) -> bool:
    if kind is tuple:
        return isinstance(value, tuple) and all(_is_a(v, int) for v in value)
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", tuple: "a list of integers"}


def validate_text_prompt(text: str) -> None:
    """A text prompt must have some text before it is tokenized (a BOS alone is no prompt)."""
    if not text or not text.strip():
        raise InvalidArgument("prompt is empty; send some text or a non-empty token_ids list")
