"""The pure scheduler, driven by hand-written step results."""

from __future__ import annotations

import pytest

from stagemesh.errors import InvalidArgument, ResourceExhausted
from stagemesh.serving.scheduler import Scheduler, SchedulerConfig
from stagemesh.serving.types import PENDING_TOKEN, Request, SampleSpec, SamplingParams, SeqChunk, StepResult, TokenEvent

EOS = 99


def make(**kw) -> Scheduler:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("eos_token_ids", (EOS,))
    return Scheduler(SchedulerConfig(**kw))


def req(rid: str, n_prompt: int = 4, max_new: int = 4, resume: tuple[int, ...] = (), **params) -> Request:
    params.setdefault("seed", 7)
    prompt = tuple(range(1, n_prompt + 1))
    return Request(rid, prompt, SamplingParams(max_new_tokens=max_new, **params), resume_token_ids=resume)


def spec(index: int, seed: int = 7) -> SampleSpec:
    return SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=seed, index=index)


def step(s: Scheduler, tokens: dict[int, int] | None = None, now: float = 0.0):
    """Schedule one plan and answer it at once; returns (plan, events)."""
    plan = s.schedule(now)
    assert plan is not None
    return plan, s.update(plan, StepResult(plan.step_id, tokens or {}))


def test_chunked_prefill_then_decode():
    s = make(max_num_batched_tokens=128, max_model_len=512, num_blocks=128)
    s.add(req("a", n_prompt=300, max_new=3))
    prompt = tuple(range(1, 301))
    p0, ev = step(s)
    assert p0.chunks == (SeqChunk(0, 0, prompt[:128]),) and ev == []
    p1, ev = step(s)
    assert p1.chunks == (SeqChunk(0, 128, prompt[128:256]),) and ev == []
    p2, ev = step(s, {0: 5})
    assert p2.chunks == (SeqChunk(0, 256, prompt[256:], spec(0)),)
    assert ev == [TokenEvent("a", 5, 0)]
    p3, ev = step(s, {0: 6})
    assert p3.chunks == (SeqChunk(0, 300, (5,), spec(1)),)
    p4, ev = step(s, {0: 7})
    assert p4.chunks == (SeqChunk(0, 301, (6,), spec(2)),)
    assert ev == [TokenEvent("a", 7, 2, "length")]
    assert [p.step_id for p in (p0, p1, p2, p3, p4)] == [0, 1, 2, 3, 4]


def test_continuous_batching_new_request_joins_next_plan():
    s = make()
    s.add(req("a", max_new=10))
    step(s, {0: 50})
    step(s, {0: 51})
    s.add(req("b", n_prompt=3))
    plan, ev = step(s, {0: 52, 1: 60})
    assert plan.chunks == (SeqChunk(0, 5, (51,), spec(2)), SeqChunk(1, 0, (1, 2, 3), spec(0)))
    assert ev == [TokenEvent("a", 52, 2), TokenEvent("b", 60, 0)]
    plan, _ = step(s, {0: 53, 1: 61})
    assert [(c.seq_id, c.token_ids) for c in plan.chunks] == [(0, (52,)), (1, (60,))]


def test_decodes_come_before_prefills_within_the_token_budget():
    s = make(max_num_batched_tokens=6)
    s.add(req("a", max_new=10))
    step(s, {0: 50})
    s.add(req("b", n_prompt=8))
    plan, _ = step(s, {0: 51})
    assert plan.chunks == (SeqChunk(0, 4, (50,), spec(1)), SeqChunk(1, 0, (1, 2, 3, 4, 5)))


@pytest.mark.parametrize(
    "params, tokens, reason",
    [
        ({}, [5, EOS], "stop"),
        ({"stop_token_ids": (42,)}, [5, 42], "stop"),
        ({"ignore_eos": True, "max_new_tokens": 3}, [EOS, EOS, EOS], "length"),
        ({"max_new_tokens": 2}, [5, 6], "length"),
    ],
)
def test_finish_reasons(params, tokens, reason):
    s = make()
    params.setdefault("max_new_tokens", 10)
    s.add(Request("a", (1, 2), SamplingParams(seed=1, **params)))
    events = [step(s, {0: t})[1][0] for t in tokens]
    assert [e.finish_reason for e in events] == [None] * (len(tokens) - 1) + [reason]
    assert [e.index for e in events] == list(range(len(tokens)))
    assert not s.has_unfinished() and s.kv_blocks_used == 0


def test_context_end_finishes_with_length():
    s = make(max_model_len=6)
    s.add(req("a", n_prompt=4, max_new=100))
    _, ev1 = step(s, {0: 5})
    _, ev2 = step(s, {0: 6})
    assert (ev1[0].finish_reason, ev2[0].finish_reason) == (None, "length")


def test_finished_sequence_is_freed_in_the_next_plan():
    s = make()
    s.add(req("a", max_new=1))
    s.add(req("b", max_new=5))
    plan, ev = step(s, {0: 5, 1: 6})
    assert ev[0] == TokenEvent("a", 5, 0, "length") and plan.free == ()
    plan, _ = step(s, {1: 7})
    assert plan.free == (0,) and [c.seq_id for c in plan.chunks] == [1]
    assert s.num_running == 1


def test_plan_with_only_frees_then_nothing():
    s = make()
    s.add(req("a", max_new=1))
    step(s, {0: 5})
    plan, ev = step(s)
    assert plan.chunks == () and plan.free == (0,) and ev == []
    assert s.schedule(0.0) is None


def test_request_waits_for_blocks_then_runs():
    s = make(num_blocks=2, block_size=4)  # each request reserves 4 + 4 tokens = 2 blocks
    s.add(req("a"))
    s.add(req("b"))
    plan, _ = step(s, {0: 5})
    assert [c.seq_id for c in plan.chunks] == [0] and s.num_waiting == 1 and s.kv_blocks_used == 2
    for t in (6, 7, 8):
        plan, ev = step(s, {0: t})
    assert ev[-1].finish_reason == "length" and s.kv_blocks_used == 0
    plan, ev = step(s, {1: 9})
    assert plan.free == (0,) and plan.chunks == (SeqChunk(1, 0, (1, 2, 3, 4), spec(0)),)
    assert ev == [TokenEvent("b", 9, 0)]


def test_request_that_never_fits_is_refused():
    s = make(num_blocks=4, block_size=4)  # 16 tokens of KV
    with pytest.raises(ResourceExhausted) as info:
        s.add(req("a", n_prompt=10, max_new=10))
    assert "needs 20 tokens" in info.value.message and "holds 16 tokens" in info.value.message
    assert "lower max_new_tokens" in info.value.message
    s.add(req("b", n_prompt=10, max_new=6))  # exactly 16 fits


def test_reservation_is_capped_by_the_context():
    s = make(num_blocks=4, block_size=4, max_model_len=16)
    s.add(req("a", n_prompt=10, max_new=1000))  # at most 16 tokens ever: fits


def test_queue_full():
    s = make(max_waiting=2)
    s.add(req("a"))
    s.add(req("b"))
    with pytest.raises(ResourceExhausted, match="queue full"):
        s.add(req("c"))
    s.schedule(0.0)  # admits both: the queue empties
    s.add(req("c"))


def test_duplicate_request_id_is_refused():
    s = make()
    s.add(req("a"))
    with pytest.raises(InvalidArgument, match="already running"):
        s.add(req("a"))


def test_two_slots_give_disjoint_plans_with_a_fair_share():
    s = make(num_slots=2)
    for rid in "abcd":
        s.add(req(rid))
    p0, p1 = s.schedule(0.0), s.schedule(0.0)
    assert [c.seq_id for c in p0.chunks] == [0, 1] and [c.seq_id for c in p1.chunks] == [2, 3]
    assert s.schedule(0.0) is None and s.num_in_flight == 2
    s.update(p1, StepResult(p1.step_id, {2: 5, 3: 5}))
    p2 = s.schedule(0.0)
    assert [c.seq_id for c in p2.chunks] == [2, 3]  # 0 and 1 are still busy in p0
    assert s.schedule(0.0) is None


def test_max_num_seqs_caps_a_plan():
    s = make(max_num_seqs=2)
    for rid in "abc":
        s.add(req(rid))
    plan, _ = step(s, {0: 5, 1: 5})
    assert [c.seq_id for c in plan.chunks] == [0, 1]


def test_abort_waiting_running_and_busy():
    s = make(num_blocks=2)
    s.add(req("a"))
    s.add(req("b"))
    step(s, {0: 5})
    assert s.abort("b") and s.num_waiting == 0  # waiting: just dropped
    assert s.abort("a") and s.num_running == 0  # running, not busy: freed at once
    assert s.schedule(0.0).free == (0,)
    assert not s.abort("a") and not s.abort("nobody")


def test_abort_busy_drops_its_token_and_frees_after_update():
    s = make()
    s.add(req("a"))
    s.add(req("b"))
    plan = s.schedule(0.0)
    assert s.abort("a") and s.num_running == 2
    ev = s.update(plan, StepResult(plan.step_id, {0: 5, 1: 6}))
    assert ev == [TokenEvent("b", 6, 0)]
    plan, _ = step(s, {1: 7})
    assert plan.free == (0,) and [c.seq_id for c in plan.chunks] == [1]


def test_fail_finishes_the_plans_sequences_and_requeues_its_frees():
    s = make()
    s.add(req("a", max_new=1))
    s.add(req("b"))
    step(s, {0: 5, 1: 6})  # a finishes: seq 0 pending free
    s.add(req("c"))
    plan = s.schedule(0.0)
    assert plan.free == (0,)
    assert s.fail(plan) == ["b", "c"]
    assert s.num_in_flight == 0 and s.kv_blocks_used == 0 and not s.has_unfinished()
    assert sorted(s.schedule(0.0).free) == [0, 1, 2]
    with pytest.raises(ValueError, match="not in flight"):
        s.fail(plan)


def test_resume_reprefills_and_continues_the_sampling_index():
    s = make()
    s.add(req("a", n_prompt=3, max_new=4, resume=(50, 51)))
    plan, ev = step(s, {0: 52})
    assert plan.chunks == (SeqChunk(0, 0, (1, 2, 3, 50, 51), spec(2)),)
    assert ev == [TokenEvent("a", 52, 2)]
    plan, ev = step(s, {0: 53})
    assert plan.chunks == (SeqChunk(0, 5, (52,), spec(3)),)
    assert ev == [TokenEvent("a", 53, 3, "length")]


def test_resume_with_nothing_left_ends_at_once():
    s = make()
    assert s.add(req("a", max_new=2, resume=(50, 51))) == [TokenEvent("a", None, 2, "length")]
    assert not s.has_unfinished()


def test_seed_is_drawn_when_missing():
    s = make()
    s.add(req("a", seed=None))
    s.add(req("b", seed=123))
    seed = s.seed_of("a")
    assert 0 <= seed < 2**31 and s.seed_of("b") == 123
    plan = s.schedule(0.0)
    assert [c.sample.seed for c in plan.chunks] == [seed, 123]


def test_update_refuses_a_broken_result():
    s = make()
    s.add(req("a"))
    plan = s.schedule(0.0)
    with pytest.raises(ValueError, match="no token for sequences \\[0\\]"):
        s.update(plan, StepResult(plan.step_id, {}))
    with pytest.raises(ValueError, match="result of step 9"):
        s.update(plan, StepResult(9, {0: 1}))
    s.update(plan, StepResult(plan.step_id, {0: 1}))
    with pytest.raises(ValueError, match="not in flight"):
        s.update(plan, StepResult(plan.step_id, {0: 1}))


@pytest.mark.parametrize("field, value", [("num_blocks", 0), ("block_size", -1), ("num_slots", 0),
                                          ("max_model_len", 0), ("eos_token_ids", (-3,))])
def test_config_validation_names_the_value(field, value):
    kw = {"num_blocks": 8, "max_model_len": 64, field: value}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kw)


# --- overlap scheduling: one plan more in flight, decodes of the pending token ---------------


def answer(s, plan, tokens):
    return s.update(plan, StepResult(plan.step_id, tokens))


def test_overlap_sends_a_lookahead_decode_of_the_pending_token():
    s = make(overlap=True)
    s.add(req("a", max_new=3))
    prompt = (1, 2, 3, 4)
    p0, p1 = s.schedule(0.0), s.schedule(0.0)
    assert p0.chunks == (SeqChunk(0, 0, prompt, spec(0)),)
    assert p1.chunks == (SeqChunk(0, 4, (PENDING_TOKEN,), spec(1)),)
    assert s.schedule(0.0) is None and s.num_in_flight == 2
    assert answer(s, p0, {0: 5}) == [TokenEvent("a", 5, 0)]
    p2 = s.schedule(0.0)
    assert p2.chunks == (SeqChunk(0, 5, (PENDING_TOKEN,), spec(2)),)
    assert answer(s, p1, {0: 6}) == [TokenEvent("a", 6, 1)]
    assert s.schedule(0.0) is None  # its pending token is its last (max_new=3): no lookahead past it
    assert answer(s, p2, {0: 7}) == [TokenEvent("a", 7, 2, "length")]
    assert s.schedule(0.0).free == (0,) and s.kv_blocks_used == 0


def test_overlap_continues_a_chunked_prefill_without_waiting():
    s = make(overlap=True, max_num_batched_tokens=128, max_model_len=512, num_blocks=128)
    s.add(req("a", n_prompt=300, max_new=5))
    prompt = tuple(range(1, 301))
    p0, p1 = s.schedule(0.0), s.schedule(0.0)
    assert p0.chunks == (SeqChunk(0, 0, prompt[:128]),) and p1.chunks == (SeqChunk(0, 128, prompt[128:256]),)
    assert answer(s, p0, {}) == []
    p2 = s.schedule(0.0)
    assert p2.chunks == (SeqChunk(0, 256, prompt[256:], spec(0)),)
    answer(s, p1, {})
    p3 = s.schedule(0.0)
    assert p3.chunks == (SeqChunk(0, 300, (PENDING_TOKEN,), spec(1)),)
    assert answer(s, p2, {0: 9}) == [TokenEvent("a", 9, 0)]


def test_overlap_stop_token_drops_the_lookahead_and_frees_after_it():
    s = make(overlap=True)
    s.add(req("a", max_new=10))
    s.add(req("b", max_new=10))
    p0, p1 = s.schedule(0.0), s.schedule(0.0)
    assert [c.token_ids for c in p1.chunks] == [(PENDING_TOKEN,)] * 2
    assert answer(s, p0, {0: EOS, 1: 5}) == [TokenEvent("a", EOS, 0, "stop"), TokenEvent("b", 5, 0)]
    p2 = s.schedule(0.0)
    assert p2.free == (0,) and [c.seq_id for c in p2.chunks] == [1]  # after p1, which still runs a's lookahead
    assert answer(s, p1, {0: 3, 1: 6}) == [TokenEvent("b", 6, 1)]  # a's lookahead token is dropped
    assert s.kv_blocks_used == 4  # b's reservation alone: 4 + 10 tokens in blocks of 4


def test_overlap_abort_two_plans_deep_frees_after_both():
    s = make(overlap=True)
    s.add(req("a", max_new=10))
    p0, p1 = s.schedule(0.0), s.schedule(0.0)
    assert s.abort("a")
    assert answer(s, p0, {0: 5}) == [] and s.num_running == 1  # p1 still holds it
    assert s.schedule(0.0) is None
    assert answer(s, p1, {0: 6}) == [] and s.num_running == 0
    assert s.schedule(0.0).free == (0,)


def test_overlap_failed_step_drops_the_lookahead_in_the_next():
    s = make(overlap=True)
    s.add(req("a", max_new=10))
    p0, p1 = s.schedule(0.0), s.schedule(0.0)
    s.add(req("b", max_new=2))
    assert s.fail(p0) == ["a"]
    p2 = s.schedule(0.0)
    assert [c.seq_id for c in p2.chunks] == [1] and p2.free == (0,)
    assert answer(s, p1, {0: 6}) == []  # the lookahead of the failed sequence
    assert answer(s, p2, {1: 7}) == [TokenEvent("b", 7, 0)]


def test_overlap_with_two_slots_looks_ahead_only_in_the_oldest_plan():
    s = make(overlap=True, num_slots=2)
    for rid in "abcd":
        s.add(req(rid, max_new=10))
    p0, p1, p2 = s.schedule(0.0), s.schedule(0.0), s.schedule(0.0)
    assert [c.seq_id for c in p0.chunks] == [0, 1] and [c.seq_id for c in p1.chunks] == [2, 3]
    # p0's tokens come back first: only its sequences look ahead, p1's would make the stage wait
    assert [(c.seq_id, c.token_ids) for c in p2.chunks] == [(0, (PENDING_TOKEN,)), (1, (PENDING_TOKEN,))]
    assert s.schedule(0.0) is None and s.num_in_flight == 3
    answer(s, p0, {0: 5, 1: 5})
    p3 = s.schedule(0.0)
    assert [(c.seq_id, c.token_ids, c.sample.index) for c in p3.chunks] == [(2, (PENDING_TOKEN,), 1), (3, (PENDING_TOKEN,), 1)]
    answer(s, p1, {2: 6, 3: 6})
    p4 = s.schedule(0.0)
    assert [(c.seq_id, c.start) for c in p4.chunks] == [(0, 5), (1, 5)]  # p2 is now the oldest


def test_overlap_looks_ahead_only_once_the_slots_are_full():
    s = make(overlap=True, num_slots=2)
    for rid in "abcd":
        s.add(req(rid, max_new=10))
    p0 = s.schedule(0.0)
    answer(s, p0, {0: 5, 1: 5})
    p1, p2, p3 = s.schedule(0.0), s.schedule(0.0), s.schedule(0.0)
    assert [(c.seq_id, c.token_ids) for c in p1.chunks] == [(0, (5,)), (1, (5,))]
    # a slot is free and c, d have nothing in flight: they fill it, not a lookahead of p1
    assert [(c.seq_id, c.start) for c in p2.chunks] == [(2, 0), (3, 0)]
    assert [(c.seq_id, c.token_ids) for c in p3.chunks] == [(0, (PENDING_TOKEN,)), (1, (PENDING_TOKEN,))]


def test_overlap_with_two_slots_and_one_request_looks_ahead_at_once():
    s = make(overlap=True, num_slots=2)
    s.add(req("a", max_new=10))
    p0, p1 = s.schedule(0.0), s.schedule(0.0)
    assert [(c.seq_id, c.token_ids) for c in p0.chunks] == [(0, (1, 2, 3, 4))]
    assert [(c.seq_id, c.token_ids) for c in p1.chunks] == [(0, (PENDING_TOKEN,))]
    assert s.schedule(0.0) is None  # never more than two plans deep
