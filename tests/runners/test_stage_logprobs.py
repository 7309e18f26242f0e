"""The last stage returns log-probabilities only for the rows that ask, each with its own number
of top tokens, from the model's own distribution (before temperature and the filters), and runs
nothing extra on a step where no row asks."""

from __future__ import annotations

import pytest
import torch

import stagemesh.runners.stage as stage_module
from stagemesh.config import StageSpec
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan
from tests.checkpoints import make_hf_checkpoint

PROMPTS = [(5, 9, 2, 7, 3), (11, 4), (8, 8, 1, 6, 2, 9, 4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=2))


def runner(model_dir: str) -> StageRunner:
    return StageRunner(model_dir, StageSpec.whole(2), num_kv_blocks=32, block_size=4)


def spec(**kw) -> SampleSpec:
    return SampleSpec(**{"temperature": 0.0, "seed": 3, "index": 0, **kw})


def test_only_the_rows_that_ask_get_logprobs_with_their_own_top_count(model_dir):
    specs = [spec(logprobs=True, top_logprobs=3), spec(), spec(logprobs=True, temperature=0.8, top_k=4, seed=9)]
    plan = StepPlan(0, tuple(SeqChunk(i, 0, p, s) for i, (p, s) in enumerate(zip(PROMPTS, specs))))
    r = runner(model_dir)
    result = r.step(plan, None)
    assert set(result.logprobs) == {0, 2}
    assert len(result.logprobs[0].top) == 3 and result.logprobs[2].top == ()

    # the reference: the same prompts' last-position logits, each alone, log_softmax'd (no temperature)
    for seq in (0, 2):
        alone = runner(model_dir)
        hidden = alone.step(StepPlan(0, (SeqChunk(0, 0, PROMPTS[seq][:-1], None),)), None)
        assert not hidden.tokens  # nothing sampled; the KV of all but the last token is in place
        x = alone.model(torch.tensor([PROMPTS[seq][-1]]), *_decode_meta(alone, len(PROMPTS[seq]) - 1))
        reference = torch.log_softmax(alone.model.logits(x)[0], dim=-1)
        lp = result.logprobs[seq]
        assert lp.logprob == pytest.approx(float(reference[result.tokens[seq]]), abs=1e-5)
        for token, value in lp.top:
            assert value == pytest.approx(float(reference[token]), abs=1e-5)
        if lp.top:
            assert [t for t, _ in lp.top] == reference.topk(len(lp.top)).indices.tolist()


def _decode_meta(r: StageRunner, start: int):
    from stagemesh.model.attention import AttnMetadata

    table = r.cache.ensure(0, start + 1)
    meta = AttnMetadata.build([start], [1], [table], r.cache.block_size, r.device, r.config.sliding_window, r.dtype)
    return meta, r.cache


def test_a_step_where_no_row_asks_computes_no_logprobs(model_dir, monkeypatch):
    def refuse(*args):
        raise AssertionError("token_logprobs ran on a step where no row asked")

    monkeypatch.setattr(stage_module, "token_logprobs", refuse)
    plan = StepPlan(0, tuple(SeqChunk(i, 0, p, spec(top_logprobs=0)) for i, p in enumerate(PROMPTS)))
    result = runner(model_dir).step(plan, None)
    assert len(result.tokens) == 3 and result.logprobs == {}
