"""The first stage of a longer chain fills in pending tokens from the answers it relays."""

from __future__ import annotations

import threading

import pytest

from stage_worker.feedback import SampledTokens
from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.serving.types import PENDING_TOKEN, SampleSpec, SeqChunk, StepPlan

GREEDY = SampleSpec(seed=0, index=0)


def request(step_id: int, chunks: list[tuple[int, list[int], bool]], free: tuple[int, ...] = ()) -> StepPlan:
    """A step of (seq id, token ids, samples) chunks."""
    chunks = tuple(SeqChunk(seq, 0, tuple(tokens), GREEDY if sample else None) for seq, tokens, sample in chunks)
    return StepPlan(step_id, chunks, free)


def ran(sampled: SampledTokens, plan: StepPlan) -> StepPlan:
    """What the pipeline does with a step before it runs: fill in, then expect its tokens."""
    plan = sampled.fill(plan)
    sampled.expect(plan)
    return plan


def token_ids(plan: StepPlan) -> list[int]:
    return [t for c in plan.chunks for t in c.token_ids]


def test_a_pending_token_is_filled_in_from_the_relayed_answer():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5, 6, 7], True), (2, [8, 9], False)]))
    sampled.land(0, {1: 42})
    lookahead = ran(sampled, request(1, [(1, [PENDING_TOKEN], True), (2, [10], True)]))
    assert token_ids(lookahead) == [42, 10]


def test_the_step_waits_for_a_token_still_coming():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    got = []
    filled = threading.Thread(target=lambda: got.append(sampled.fill(request(1, [(1, [PENDING_TOKEN], True)]))))
    filled.start()
    filled.join(0.2)
    assert filled.is_alive()  # the answer to step 0 has not come back
    sampled.land(0, {1: 77})
    filled.join(5)
    assert not filled.is_alive() and token_ids(got[0]) == [77]


def test_each_pending_token_takes_the_latest_answer():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    sampled.land(0, {1: 11})
    ran(sampled, request(1, [(1, [PENDING_TOKEN], True)]))  # takes 11; 12 is now coming
    sampled.land(1, {1: 12})
    assert token_ids(ran(sampled, request(2, [(1, [PENDING_TOKEN], True)]))) == [12]


def test_a_failed_step_fills_in_a_placeholder_for_its_already_failed_sequences():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    sampled.land(0, None)  # it failed, e.g. stage c0-s1 was unreachable
    assert token_ids(ran(sampled, request(1, [(1, [PENDING_TOKEN], True)]))) == [0]
    failed_here = request(2, [(3, [4, 4], True)])
    sampled.fail(failed_here)  # failed on this stage before or after expect: its token never comes
    assert token_ids(ran(sampled, request(3, [(3, [PENDING_TOKEN], True)]))) == [0]


def test_a_pending_token_nothing_backs_is_refused():
    sampled = SampledTokens("c0-s0")
    with pytest.raises(InvalidArgument, match="no step through stage c0-s0 has sampled one"):
        sampled.fill(request(0, [(9, [PENDING_TOKEN], True)]))
    ran(sampled, request(1, [(1, [5], True)]))
    sampled.land(1, {1: 6})
    ran(sampled, request(2, [], free=(1,)))
    with pytest.raises(InvalidArgument, match="sequence 1 asks"):  # freed: forgotten
        sampled.fill(request(3, [(1, [PENDING_TOKEN], True)]))
    with pytest.raises(InvalidArgument, match="only a one-token chunk may have one"):
        sampled.fill(request(4, [(1, [3, PENDING_TOKEN], True)]))


def test_an_answer_for_a_freed_sequence_is_not_kept():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    ran(sampled, request(1, [], free=(1,)))
    sampled.land(0, {1: 6})
    with pytest.raises(InvalidArgument, match="sequence 1 asks"):
        sampled.fill(request(2, [(1, [PENDING_TOKEN], True)]))


def test_a_token_that_never_comes_fails_the_step_after_the_timeout():
    sampled = SampledTokens("c0-s0", timeout_s=0.1)
    ran(sampled, request(0, [(1, [5], True)]))
    with pytest.raises(Unavailable, match="waited 0.1 s for the token of sequence 1"):
        sampled.fill(request(1, [(1, [PENDING_TOKEN], True)]))
