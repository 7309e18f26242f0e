"""The sampling rows' bounds on the last stage: rows already found good are remembered, bad ones never are."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stagemesh.errors import InvalidArgument
from stagemesh.runners.step_checks import _CHECKED_ROWS, KVState, StageLimits, check_step
from stagemesh.serving.params import SamplingParams, sample_spec
from stagemesh.serving.types import SeqChunk, StepPlan

LAST = StageLimits(vocab_size=100, hidden_size=8, context=64, block_size=16, is_first=False, is_last=True)


def _check(spec) -> None:
    """One decode step of sequence 0 (4 tokens held) sampling with ``spec``, checked on the last stage."""
    check_step(StepPlan(3, (SeqChunk(0, 4, (5,), spec),)), torch.zeros(1, 8), LAST, KVState({0: 4}, {0: [0]}, 10))


@pytest.mark.parametrize(("field", "bad"), [("temperature", float("nan")), ("temperature", -1.0), ("top_p", 1.5),
                                            ("top_k", -2), ("min_p", 2.0)])
def test_a_bad_row_is_refused_every_time_even_beside_remembered_good_ones(field, bad):
    good = sample_spec(SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9), seed=1, index=0)
    _check(good)
    assert any(row[0] == 0.7 for row in _CHECKED_ROWS)  # the good row is remembered
    forged = dataclasses.replace(good, **{field: bad})
    for _ in range(2):
        with pytest.raises(InvalidArgument, match=f"{field} = "):
            _check(forged)
    _check(good)
