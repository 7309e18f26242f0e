"""``RemoteChain``'s step deadline against a stage on a real ephemeral port: a step that overstays
the deadline that follows the measured step time fails UNAVAILABLE within about that deadline,
and a step queued behind a long one is timed from when the one ahead was answered."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.chain_client import STEP_DEADLINE, RemoteChain
from stagemesh.errors import Unavailable
from stagemesh.runtime.deadline import Deadline, DeadlinePolicy
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan
from stagemesh.v1 import stage_pb2, stage_pb2_grpc

FAST = DeadlinePolicy(floor_s=0.3, multiple=1.0, first_s=10.0, ceiling_s=10.0, min_samples=4)
"""Small numbers so the test is quick: a 1-token step may take 0.3 s + its measured p99."""


class ScriptedStage(stage_pb2_grpc.StageServicer):
    """Answers each step in order after ``delays[step_id]`` seconds (none by default)."""

    def __init__(self, delays: dict[int, float]):
        self.delays = delays

    async def Forward(self, request_iterator, context):
        async for request in request_iterator:
            await asyncio.sleep(self.delays.get(request.step_id, 0.0))
            sampled = [s for s, flag in zip(request.seq_ids, request.sample) if flag]
            yield stage_pb2.StageResponse(step_id=request.step_id, seq_ids=sampled, tokens=[7] * len(sampled))


def _plan(step_id: int, tokens: int = 1) -> StepPlan:
    return StepPlan(step_id, (SeqChunk(0, 0, tuple(range(3, 3 + tokens)), SampleSpec(seed=0, index=0)),))


async def _with_stage(delays: dict[int, float], body):
    server = grpc.aio.server()
    stage_pb2_grpc.add_StageServicer_to_server(ScriptedStage(delays), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    deadline = Deadline(FAST)
    for _ in range(FAST.min_samples):
        deadline.observe(0.05, 1)  # measured before: p99 0.05 s per 1-token step
    chain = RemoteChain(0, f"127.0.0.1:{port}", deadline=deadline)
    try:
        return await body(chain)
    finally:
        await chain.close()
        await server.stop(None)


def test_a_frozen_step_fails_unavailable_within_its_measured_deadline():
    async def body(chain: RemoteChain):
        for step_id in range(4):
            await chain.step(_plan(step_id))
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"is unreachable: it did not answer step 4 within 0\.3\d s") as err:
            await chain.step(_plan(4))
        waited = time.monotonic() - t0
        again = await chain.step(_plan(5))  # a fresh stream; step 5 answers at once
        return waited, err.value.message, again

    waited, message, again = asyncio.run(_with_stage({4: 30.0}, body))
    assert 0.3 <= waited < 1.5, waited
    assert "deadline from its step time: p99" in message
    assert again.tokens == {0: 7}


def test_a_step_behind_a_long_prefill_is_timed_from_the_answer_ahead_of_it():
    # step 0: a 200-token prefill chunk taking 0.6 s (its limit scales with its tokens: well over
    # 0.6 s); step 1, one token, sent right behind it, answers at once after it. Timed from its
    # own send it would have waited 0.6 s > its 0.35 s limit.
    async def body(chain: RemoteChain):
        return await asyncio.gather(chain.step(_plan(0, tokens=200)), chain.step(_plan(1)))

    long, short = asyncio.run(_with_stage({0: 0.6}, body))
    assert long.step_id == 0 and short.step_id == 1 and short.tokens == {0: 7}


def test_healthy_steps_feed_the_deadline_but_a_step_of_frees_only_does_not():
    # a returning chain's first step only frees KV, and may have waited out a backlog
    async def body(chain: RemoteChain):
        before = chain.deadline.measured
        await chain.step(StepPlan(0, (), (5, 6)))
        for step_id in range(1, 4):
            await chain.step(_plan(step_id))
        return chain.deadline.measured - before

    assert asyncio.run(_with_stage({0: 0.2}, body)) == 3


def test_the_default_policy_fences_a_frozen_chain_within_5_s_up_to_a_p99_of_1_s():
    assert RemoteChain(0, "127.0.0.1:1").deadline.policy == STEP_DEADLINE
    deadline = Deadline(STEP_DEADLINE)
    assert deadline.limit(8) == 60.0  # warm-up
    for _ in range(STEP_DEADLINE.min_samples):
        deadline.observe(1.0, 8)
    assert deadline.limit(8) == 5.0
