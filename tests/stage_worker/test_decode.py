"""The stage's edge: a StageStep goes on the wire once and comes off it as the same step."""

from __future__ import annotations

import pytest
import torch

from stage_worker.decode import decode_step, encode_step
from stagemesh.errors import InvalidArgument
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan

PLAN = StepPlan(3, (SeqChunk(1, 4, (7, 8), SampleSpec(seed=5, index=2, temperature=0.5, min_p=0.2)),), free=(9,))


def test_a_step_round_trips_with_its_hidden_states():
    hidden = torch.randn(2, 6, dtype=torch.bfloat16)
    step = decode_step(encode_step(PLAN, hidden), "c0-s1")  # what a TP rank or the next stage decodes
    assert step.plan == PLAN and torch.equal(step.hidden, hidden)
    assert decode_step(encode_step(PLAN, None), "c0-s0").hidden is None


def test_a_malformed_request_names_the_stage_and_the_step():
    msg = encode_step(PLAN, None)
    del msg.lengths[:]
    with pytest.raises(InvalidArgument, match="stage c0-s1: malformed StageRequest 3"):
        decode_step(msg, "c0-s1")
