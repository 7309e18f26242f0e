"""What a stage checks of a step before it applies any of it: the whole step, or nothing.

NOTE: a stage's steps come over the network, so a step may be malformed or forged. Every
field is checked here against the model and against the stage's own KV state *before* the
runner frees, reserves or writes anything, so a refused step (``InvalidArgument``; a step that
does not fit the free KV blocks: ``ResourceExhausted``) leaves every sequence as it was:

- token ids in ``[0, vocab)``; ``PENDING_TOKEN`` only as the one token of a chunk on the
  first stage (it fills it in); a later stage's hidden states are a floating tensor of
  ``[tokens, hidden_size]``, and the first stage gets none (it embeds);
- chunks: sequence ids >= 0, each at most once per step, at least one token each; a chunk
  starts where the stage's KV of that sequence ends (0 for a new one, after this step's frees
  and a new epoch's drop), and ends within the model's context (``max_position_embeddings``);
- sampling rows (last stage): every ``SampleSpec`` field within its ``SamplingParams`` bounds,
  seed and token index >= 0;
- the KV blocks the step needs beyond what its sequences hold fit the stage's free blocks.

What this cannot tell is whether the sender is the gateway: a well-formed forged step of the
current epoch is indistinguishable from a real one (the mesh's mTLS answers that; see
docs/security.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch

from stagemesh.errors import InvalidArgument, ResourceExhausted
from stagemesh.serving.blocks import blocks_needed
from stagemesh.serving.params import MAX_SEED, PARAMS, SAMPLE_FIELDS, param_of
from stagemesh.serving.types import PENDING_TOKEN, SeqChunk, StepPlan

_BOUNDS = {f.name: param_of(f).bounds for f in PARAMS if f.name in SAMPLE_FIELDS and param_of(f).bounds is not None}
"""The bounds of each sampling column that has some (the others are seed and index)."""
_BOUNDED = attrgetter(*_BOUNDS)
"""A SampleSpec's values of those columns, as one tuple."""
_CHECKED_ROWS: set[tuple] = set()
"""Values of ``_BOUNDED`` found within their bounds already (a sequence's row is the same at
every step it samples in).

NOTE: the bounds are fixed, so a tuple once in them always is; checking them per row per step
was over half of the last stage's checks: 4.9 → 2.0 µs a row with this set, 2.2 → 1.5 on a
middle stage with the loop's own savings (128 decode rows, one core). Only good tuples enter
(a NaN never does), and the set is emptied when it reaches ``_CHECKED_ROWS_MAX``."""
_CHECKED_ROWS_MAX = 4096
_FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class StageLimits:
    """What a stage's model and place allow a step."""

    vocab_size: int
    hidden_size: int
    context: int
    """Positions a sequence may reach: the model's ``max_position_embeddings``."""
    block_size: int
    is_first: bool
    is_last: bool


@dataclass(frozen=True)
class KVState:
    """What the stage holds before the step, as the step will find it."""

    tokens: Mapping[int, int]
    """Sequence id -> tokens in the stage's KV cache (empty when the step starts a new epoch)."""
    blocks: Mapping[int, Sequence[int]]
    """Sequence id -> its block table (the KV blocks it holds)."""
    free_blocks: int


def check_step(plan: StepPlan, hidden: torch.Tensor | None, limits: StageLimits, kv: KVState, *, fit: bool = True) -> None:
    """InvalidArgument naming the first bad field of ``plan`` (and ``hidden``); with ``fit``,
    ResourceExhausted when its KV blocks do not fit. Changes nothing."""
    where = f"step {plan.step_id}"
    _check_hidden(where, plan.num_tokens, hidden, limits)
    freed = set(plan.free)
    seen: set[int] = set()
    new_blocks = 0
    for chunk in plan.chunks:
        seq, end = chunk.seq_id, chunk.end
        _check_chunk(where, chunk, end, limits)
        if seq in seen:
            raise InvalidArgument(f"{where}: sequence {seq} has more than one chunk in the step")
        seen.add(seq)
        gone = seq in freed
        held = 0 if gone else kv.tokens.get(seq, 0)
        if chunk.start != held:
            raise InvalidArgument(
                f"{where}: sequence {seq} starts at position {chunk.start}, but this stage holds "
                f"{held} of its tokens; a chunk starts where the sequence's KV cache ends"
            )
        have = 0 if gone else len(kv.blocks.get(seq, ()))
        new_blocks += max(0, blocks_needed(end, limits.block_size) - have)
    if not fit:
        return
    available = kv.free_blocks + sum(len(kv.blocks.get(s, ())) for s in freed)
    if new_blocks > available:
        raise ResourceExhausted(
            f"{where} needs {new_blocks} more KV blocks and this stage has {available} free; nothing of it ran"
        )


def _check_hidden(where: str, tokens: int, hidden: torch.Tensor | None, limits: StageLimits) -> None:
    if limits.is_first:
        if hidden is not None:
            raise InvalidArgument(f"{where}: the first stage embeds token ids; a step to it carries no hidden states")
        return
    if hidden is None and tokens == 0:  # a step that only frees
        return
    want = [tokens, limits.hidden_size]
    if hidden is None or list(hidden.shape) != want or hidden.dtype not in _FLOATING:
        got = "none" if hidden is None else f"{str(hidden.dtype).removeprefix('torch.')} {list(hidden.shape)}"
        raise InvalidArgument(
            f"{where}: got hidden states of {got}; this stage needs a floating tensor of {want} (tokens, hidden_size)"
        )


def _check_chunk(where: str, chunk: SeqChunk, end: int, limits: StageLimits) -> None:
    """``end``: ``chunk.end``, worked out once by the caller."""
    seq = chunk.seq_id
    if seq < 0:
        raise InvalidArgument(f"{where}: sequence id {seq} is negative")
    if not chunk.token_ids:
        raise InvalidArgument(f"{where}: sequence {seq} has a chunk of no tokens; a chunk has at least one")
    if chunk.start < 0 or end > limits.context:
        raise InvalidArgument(
            f"{where}: sequence {seq} runs positions [{chunk.start}, {end}); the model's context is "
            f"[0, {limits.context})"
        )
    pending_ok = limits.is_first and len(chunk.token_ids) == 1
    low, high = min(chunk.token_ids), max(chunk.token_ids)
    if high >= limits.vocab_size or (low < 0 and not (pending_ok and low == PENDING_TOKEN)):
        bad = next(t for t in chunk.token_ids if t >= limits.vocab_size or t < 0)
        raise InvalidArgument(
            f"{where}: sequence {seq} has token id {bad}; token ids are in [0, {limits.vocab_size}) "
            f"({PENDING_TOKEN} only as the one token of a chunk, on the first stage)"
        )
    if chunk.sample is not None and limits.is_last:
        _check_sample(where, seq, chunk.sample)


def _check_sample(where: str, seq: int, spec) -> None:
    if not 0 <= spec.seed < MAX_SEED or spec.index < 0:
        raise InvalidArgument(f"{where}: sequence {seq} has seed {spec.seed} and index {spec.index}; both are >= 0")
    row = _BOUNDED(spec)
    if row in _CHECKED_ROWS:
        return
    for (name, bounds), value in zip(_BOUNDS.items(), row):
        if value not in bounds:  # nan is in no bounds
            raise InvalidArgument(f"{where}: sequence {seq} has {name} = {value}; it must be {bounds}")
    if len(_CHECKED_ROWS) >= _CHECKED_ROWS_MAX:
        _CHECKED_ROWS.clear()
    _CHECKED_ROWS.add(row)
