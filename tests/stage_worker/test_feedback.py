"""The first stage of a longer chain fills in pending tokens from the answers it relays."""

from __future__ import annotations

import threading

import pytest

from stage_worker.feedback import SampledTokens
from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.serving.types import PENDING_TOKEN
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import failed_step_to_pb, pack_int64, unpack_int64


def request(step_id: int, chunks: list[tuple[int, list[int], bool]], free: tuple[int, ...] = ()) -> stage_pb2.StageRequest:
    """A StageRequest of (seq id, token ids, samples) chunks."""
    return stage_pb2.StageRequest(
        step_id=step_id,
        seq_ids=[seq for seq, _, _ in chunks],
        starts=[0] * len(chunks),
        lengths=[len(tokens) for _, tokens, _ in chunks],
        token_ids=pack_int64(t for _, tokens, _ in chunks for t in tokens),
        sample=[sample for _, _, sample in chunks],
        free=free,
    )


def answer(step_id: int, tokens: dict[int, int]) -> stage_pb2.StageResponse:
    return stage_pb2.StageResponse(step_id=step_id, seq_ids=list(tokens), tokens=list(tokens.values()))


def ran(sampled: SampledTokens, req: stage_pb2.StageRequest) -> stage_pb2.StageRequest:
    """What the pipeline does with a step before it runs: fill in, then expect its tokens."""
    sampled.fill(req)
    sampled.expect(req)
    return req


def test_a_pending_token_is_filled_in_from_the_relayed_answer():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5, 6, 7], True), (2, [8, 9], False)]))
    sampled.land(answer(0, {1: 42}))
    lookahead = ran(sampled, request(1, [(1, [PENDING_TOKEN], True), (2, [10], True)]))
    assert list(unpack_int64(lookahead.token_ids)) == [42, 10]


def test_the_step_waits_for_a_token_still_coming():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    lookahead = request(1, [(1, [PENDING_TOKEN], True)])
    filled = threading.Thread(target=sampled.fill, args=(lookahead,))
    filled.start()
    filled.join(0.2)
    assert filled.is_alive()  # the answer to step 0 has not come back
    sampled.land(answer(0, {1: 77}))
    filled.join(5)
    assert not filled.is_alive() and list(unpack_int64(lookahead.token_ids)) == [77]


def test_each_pending_token_takes_the_latest_answer():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    sampled.land(answer(0, {1: 11}))
    ran(sampled, request(1, [(1, [PENDING_TOKEN], True)]))  # takes 11; 12 is now coming
    sampled.land(answer(1, {1: 12}))
    assert list(unpack_int64(ran(sampled, request(2, [(1, [PENDING_TOKEN], True)])).token_ids)) == [12]


def test_a_failed_step_fills_in_a_placeholder_for_its_already_failed_sequences():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    sampled.land(failed_step_to_pb(0, Unavailable("stage c0-s1 at 127.0.0.1:1 is unreachable")))
    assert list(unpack_int64(ran(sampled, request(1, [(1, [PENDING_TOKEN], True)])).token_ids)) == [0]
    failed_here = request(2, [(3, [4, 4], True)])
    sampled.fail(failed_here)  # failed on this stage before or after expect: its token never comes
    assert list(unpack_int64(ran(sampled, request(3, [(3, [PENDING_TOKEN], True)])).token_ids)) == [0]


def test_a_pending_token_nothing_backs_is_refused():
    sampled = SampledTokens("c0-s0")
    with pytest.raises(InvalidArgument, match="no step through stage c0-s0 has sampled one"):
        sampled.fill(request(0, [(9, [PENDING_TOKEN], True)]))
    ran(sampled, request(1, [(1, [5], True)]))
    sampled.land(answer(1, {1: 6}))
    ran(sampled, request(2, [], free=(1,)))
    with pytest.raises(InvalidArgument, match="sequence 1 asks"):  # freed: forgotten
        sampled.fill(request(3, [(1, [PENDING_TOKEN], True)]))
    with pytest.raises(InvalidArgument, match="only a one-token chunk may have one"):
        sampled.fill(request(4, [(1, [3, PENDING_TOKEN], True)]))


def test_an_answer_for_a_freed_sequence_is_not_kept():
    sampled = SampledTokens("c0-s0")
    ran(sampled, request(0, [(1, [5], True)]))
    ran(sampled, request(1, [], free=(1,)))
    sampled.land(answer(0, {1: 6}))
    with pytest.raises(InvalidArgument, match="sequence 1 asks"):
        sampled.fill(request(2, [(1, [PENDING_TOKEN], True)]))


def test_a_token_that_never_comes_fails_the_step_after_the_timeout():
    sampled = SampledTokens("c0-s0", timeout_s=0.1)
    ran(sampled, request(0, [(1, [5], True)]))
    with pytest.raises(Unavailable, match="waited 0.1 s for the token of sequence 1"):
        sampled.fill(request(1, [(1, [PENDING_TOKEN], True)]))
