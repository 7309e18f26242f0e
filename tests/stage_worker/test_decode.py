"""The stage's edge: a StageStep goes on the wire once and comes off it as the same step."""

from __future__ import annotations

import pytest
import torch

from stage_worker.decode import decode_step, encode_step, forward_step
from stagemesh.errors import InvalidArgument
from stagemesh.serving.types import PENDING_TOKEN, SampleSpec, SeqChunk, StepPlan
from stagemesh.wire.codec.messages import SPEC_NOT_READ

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


def test_a_received_step_goes_on_with_this_stages_output_and_its_columns_untouched():
    received = decode_step(encode_step(PLAN, torch.zeros(2, 6)), "c0-s1")
    out = torch.randn(2, 6)
    forward = decode_step(forward_step(received, received.plan, out), "c0-s2")
    assert forward.plan == PLAN and torch.equal(forward.hidden, out)


def test_pending_tokens_filled_in_by_the_first_stage_go_on_filled():
    pending = StepPlan(4, (SeqChunk(1, 6, (PENDING_TOKEN,), SampleSpec(seed=5, index=3)), SeqChunk(2, 0, (3, 4))))
    received = decode_step(encode_step(pending, None), "c0-s0")
    filled = received.plan.fill_pending(lambda seq: 42)
    forward = decode_step(forward_step(received, filled, torch.ones(3, 6)), "c0-s1")
    assert forward.plan == filled and [c.token_ids for c in forward.plan.chunks] == [(42,), (3, 4)]


def test_a_stage_before_the_last_forwards_the_sampling_parameters_it_did_not_read():
    received = decode_step(encode_step(PLAN, torch.zeros(2, 6)), "c0-s0", samples=False)
    assert [c.sample for c in received.plan.chunks] == [SPEC_NOT_READ]
    last = decode_step(forward_step(received, received.plan, torch.ones(2, 6)), "c0-s1")
    assert last.plan == PLAN  # the last stage reads them as the gateway sent them
