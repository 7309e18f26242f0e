"""A single-stage runner fills in ``PENDING_TOKEN`` (overlap scheduling) with the token it
sampled last for the sequence, and refuses it where it cannot."""

from __future__ import annotations

import pytest
import torch

from stagemesh.config import StageSpec
from stagemesh.errors import InvalidArgument
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import PENDING_TOKEN, SampleSpec, SeqChunk, StepPlan
from tests.checkpoints import make_hf_checkpoint

PROMPTS = [(5, 9, 2, 7, 3), (11, 4), (8, 8, 1, 6, 2, 9, 4)]
GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=2))


def runner(model_dir: str, spec: StageSpec | None = None) -> StageRunner:
    return StageRunner(model_dir, spec or StageSpec.whole(2), num_kv_blocks=32, block_size=4)


def prefill(r: StageRunner) -> dict[int, int]:
    plan = StepPlan(0, tuple(SeqChunk(i, 0, p, GREEDY) for i, p in enumerate(PROMPTS)))
    return r.step(plan, None).tokens


def test_pending_token_is_the_token_sampled_before(model_dir):
    explicit, pending = runner(model_dir), runner(model_dir)
    tokens = prefill(explicit)
    assert prefill(pending) == tokens
    for step in range(1, 5):
        starts = [len(p) + step - 1 for p in PROMPTS]
        known = StepPlan(step, tuple(SeqChunk(i, s, (tokens[i],), GREEDY) for i, s in enumerate(starts)))
        lookahead = StepPlan(step, tuple(SeqChunk(i, s, (PENDING_TOKEN,), GREEDY) for i, s in enumerate(starts)))
        tokens, got = explicit.step(known, None).tokens, pending.step(lookahead, None).tokens
        assert got == tokens
    # the KV written from the filled-in tokens is the KV of the explicit ones, bit for bit
    assert torch.equal(explicit.cache.kv, pending.cache.kv)


def test_pending_token_is_refused_where_no_token_backs_it(model_dir):
    r = runner(model_dir)
    prefill(r)
    never_sampled = StepPlan(1, (SeqChunk(7, 0, (PENDING_TOKEN,), GREEDY),))
    with pytest.raises(InvalidArgument, match="sequence 7 asks for the token sampled for it before"):
        r.step(never_sampled, None)
    assert 7 not in r.cache.block_tables  # refused before any KV block was taken
    freed = StepPlan(2, (SeqChunk(0, len(PROMPTS[0]), (PENDING_TOKEN,), GREEDY),), free=(0,))
    with pytest.raises(InvalidArgument, match="sequence 0 starts at position 5, but this stage holds 0"):
        r.step(freed, None)  # freed: no KV left to continue, let alone a token to fill in
    in_a_longer_chunk = StepPlan(3, (SeqChunk(1, len(PROMPTS[1]), (PENDING_TOKEN, 3), GREEDY),))
    with pytest.raises(InvalidArgument, match="only as the one token of a chunk"):
        r.step(in_a_longer_chunk, None)


def test_pending_token_is_refused_by_a_stage_that_does_not_sample(model_dir):
    first = runner(model_dir, StageSpec(0, 1, 2))
    first.step(StepPlan(0, (SeqChunk(0, 0, PROMPTS[0]),)), None)
    with pytest.raises(InvalidArgument, match="the first stage's worker fills it in"):
        first.step(StepPlan(1, (SeqChunk(0, len(PROMPTS[0]), (PENDING_TOKEN,), GREEDY),)), None)
