"""Fuzzed steps against a stage runner that also runs a legitimate generation, with the
gateway's epoch known to the fuzzer (the worst case short of a forged newer epoch).

Each fuzzed step, decoded from a mutated ``StageRequest`` as a worker decodes it, is either
refused (``InvalidArgument``, ``ResourceExhausted``, ``Unavailable``) with every sequence's KV
as it was, or runs on the fuzzer's own sequences. A well-formed step that would touch the
legitimate sequences is what only authentication stops (docs/security.md): the fuzzer skips
those. The legitimate sequences end with the tokens of a run without the fuzzer.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from stage_worker.decode import decode_step
from stagemesh.config import StageSpec
from stagemesh.errors import InvalidArgument, ResourceExhausted, StagemeshError, Unavailable
from stagemesh.runners.stage import IDLE_STEPS, StageRunner
from stagemesh.serving.types import PENDING_TOKEN, SampleSpec, SeqChunk, StepPlan
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import plan_to_pb
from stagemesh.wire.codec.tensors import tensor_to_pb
from tests.checkpoints import make_hf_checkpoint
from tests.fuzzing import N_DEFAULT, mutate

N = int(os.environ.get("STAGEMESH_FUZZ_N", N_DEFAULT))
EPOCH = 1_000_000
LEGIT = {0: (5, 9, 2, 7, 3), 1: (11, 4, 4), 2: (300, 1, 2, 3, 4, 5, 6, 7, 8)}
FORGER = (1000, 1001, 2**40)
GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0)
REFUSALS = (InvalidArgument, ResourceExhausted, Unavailable)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=2))


def _runner(model_dir, spec=None) -> StageRunner:
    return StageRunner(model_dir, spec or StageSpec.whole(2), num_kv_blocks=48, block_size=4)


def _legit_steps(runner: StageRunner, decode_steps: int, between=lambda: None) -> dict[int, list[int]]:
    """Prefill every legitimate sequence, then decode them ``decode_steps`` times (with pending
    tokens, as overlap scheduling sends them); ``between()`` runs after every step."""
    out = {seq: [] for seq in LEGIT}
    step = 0
    for seq, prompt in LEGIT.items():
        out[seq].append(runner.step(StepPlan(step, (SeqChunk(seq, 0, prompt, GREEDY),), epoch=EPOCH), None).tokens[seq])
        step += 1
        between()
    for i in range(decode_steps):
        chunks = tuple(SeqChunk(seq, len(p) + i, (PENDING_TOKEN,), GREEDY) for seq, p in LEGIT.items())
        tokens = runner.step(StepPlan(step, chunks, epoch=EPOCH), None).tokens
        for seq in LEGIT:
            out[seq].append(tokens[seq])
        step += 1
        between()
    return out


def _templates() -> list[stage_pb2.StageRequest]:
    """Valid-looking steps to mutate: of the fuzzer's own sequences, of the legitimate ones, frees."""
    return [
        plan_to_pb(StepPlan(7, (SeqChunk(FORGER[0], 0, (1, 2, 3), GREEDY),), epoch=EPOCH)),
        plan_to_pb(StepPlan(8, (SeqChunk(0, 5, (PENDING_TOKEN,), GREEDY), SeqChunk(FORGER[1], 0, (4,), GREEDY)),
                            epoch=EPOCH)),
        plan_to_pb(StepPlan(9, (SeqChunk(FORGER[2], 0, tuple(range(40)), None),), free=(FORGER[0],), epoch=EPOCH)),
        plan_to_pb(StepPlan(10, (), free=(1,), epoch=EPOCH)),
    ]


def _state(runner: StageRunner):
    return ({s: list(t) for s, t in runner.cache.block_tables.items()}, dict(runner.cache.seq_tokens),
            runner.cache.allocator.num_free, dict(runner.sampled), runner.epoch)


def _touches_legit(plan: StepPlan) -> bool:
    """A newer epoch drops every sequence; a chunk or a free of a legitimate one changes it."""
    return plan.epoch != EPOCH or any(c.seq_id in LEGIT for c in plan.chunks) or any(s in LEGIT for s in plan.free)


def test_fuzzed_steps_are_refused_whole_or_run_apart_and_the_legit_tokens_do_not_change(model_dir):
    reference = _legit_steps(_runner(model_dir), decode_steps=6)
    runner, rng, templates = _runner(model_dir), random.Random(21), _templates()
    counts = {"refused": 0, "ran": 0, "skipped": 0, "undecodable": 0}
    per_step = max(1, N // 9)

    def fuzz() -> None:
        for _ in range(per_step):
            msg = mutate(rng.choice(templates), rng)
            if isinstance(msg, bytes):
                counts["undecodable"] += 1  # the server's decode guard answers these (tests/runtime)
                continue
            try:
                step = decode_step(msg, "s0")
            except InvalidArgument:
                counts["refused"] += 1
                continue
            before = _state(runner)
            try:
                runner.check(step.plan, step.hidden)
            except REFUSALS:
                pass
            else:
                if _touches_legit(step.plan):  # well-formed and aimed at real sequences: only mTLS stops it
                    counts["skipped"] += 1
                    continue
            try:
                runner.step(step.plan, step.hidden)
                counts["ran"] += 1
            except REFUSALS:
                counts["refused"] += 1
                assert _state(runner) == before, f"a refused step changed the stage: {step.plan}"
            except StagemeshError as err:  # pragma: no cover - reported with the step
                raise AssertionError(f"{step.plan} got {err.code}") from err

    got = _legit_steps(runner, decode_steps=6, between=fuzz)
    assert got == reference, counts
    assert counts["refused"] > counts["ran"] > 0, counts
    tables = runner.cache.block_tables
    assert runner.cache.blocks_used == sum(len(t) for t in tables.values())  # no block leaked
    for seq in list(tables):
        runner.step(StepPlan(10**6, (), free=(seq,), epoch=EPOCH), None)
    assert runner.cache.blocks_used == 0


def test_fuzzed_hidden_states_on_a_later_stage_are_refused_and_change_nothing(model_dir):
    runner, rng = _runner(model_dir, StageSpec(1, 2, 2)), random.Random(4)
    plan = StepPlan(1, (SeqChunk(FORGER[0], 0, (1, 2, 3), GREEDY),), epoch=EPOCH)
    good = plan_to_pb(plan, tensor_to_pb(torch.zeros(3, runner.config.hidden_size)))
    bad = [torch.zeros(3, runner.config.hidden_size + 1), torch.zeros(2, runner.config.hidden_size),
           torch.zeros(3, runner.config.hidden_size, dtype=torch.int64), torch.zeros(3 * runner.config.hidden_size)]
    for hidden in bad:
        msg = stage_pb2.StageRequest()
        msg.CopyFrom(good)
        msg.hidden.CopyFrom(tensor_to_pb(hidden))
        with pytest.raises(InvalidArgument, match="hidden states"):
            runner.step(decode_step(msg, "s1").plan, decode_step(msg, "s1").hidden)
    for _ in range(max(1, N // 10)):
        msg = mutate(good, rng)
        if isinstance(msg, bytes):
            continue
        try:
            step = decode_step(msg, "s1")
            runner.step(step.plan, step.hidden)
        except REFUSALS:
            pass
        for seq in list(runner.cache.block_tables):
            runner.step(StepPlan(0, (), free=(seq,), epoch=runner.epoch or EPOCH), None)
    assert runner.cache.blocks_used == 0


def test_a_forged_reservation_is_bounded_by_the_context_and_dropped_once_idle_under_pressure(model_dir):
    runner = _runner(model_dir)  # 48 blocks of 4 tokens; the context is 256 tokens (64 blocks)
    context = runner.config.max_position_embeddings
    with pytest.raises(InvalidArgument, match="the model's context"):
        runner.step(StepPlan(0, (SeqChunk(FORGER[0], 0, (1,) * (context + 1), None),), epoch=EPOCH), None)
    with pytest.raises(InvalidArgument, match="starts at position 100"):  # no holes: a chunk starts where its KV ends
        runner.step(StepPlan(0, (SeqChunk(FORGER[0], 100, (1,), None),), epoch=EPOCH), None)
    assert runner.cache.blocks_used == 0
    runner.step(StepPlan(1, (SeqChunk(FORGER[0], 0, (1,) * 184, None),), epoch=EPOCH), None)  # 46 of 48 blocks
    legit = StepPlan(2, (SeqChunk(0, 0, LEGIT[2], GREEDY),), epoch=EPOCH)
    with pytest.raises(ResourceExhausted, match="nothing of it ran"):
        runner.step(legit, None)
    for step in range(IDLE_STEPS):  # the forged sequence idles while the stage runs other steps
        runner.step(StepPlan(3 + step, (), epoch=EPOCH), None)
    runner.step(legit, None)
    assert sorted(runner.cache.block_tables) == [0] and runner.cache.blocks_used == 3
