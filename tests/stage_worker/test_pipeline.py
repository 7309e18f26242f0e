"""StagePipeline: the stage is built on the thread that steps it; and ``fail``: when a TP rank
dies, the steps stuck behind a collective that will never complete (NCCL never gives up) are
answered at once, and so is every later step."""

from __future__ import annotations

import asyncio
import threading

from stage_worker.decode import StageStep
from stage_worker.pipeline import StagePipeline
from stage_worker.topology import StagePlace
from stagemesh.config import StageSpec
from stagemesh.errors import Unavailable
from stagemesh.serving.types import StepPlan

PLACE = StagePlace(
    chain=0, stage=0, num_stages=1, spec=StageSpec(0, 2, 2), address="127.0.0.1:1", device="cpu",
    model="/nowhere", block_size=16, dtype=None, kv_blocks=None, next_address=None,
)


class StubStage:
    """What the pipeline needs of a stage besides ``step``: no runner, no failure, nothing to close."""

    runner = None

    def failure(self):
        return None

    def close(self) -> None:
        pass


class HungStage(StubStage):
    """A stage whose step blocks like a collective with a dead peer, until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def step(self, step):
        self.release.wait()
        raise RuntimeError("the collective finally failed")


def test_fail_answers_the_steps_stuck_behind_a_hung_collective_and_every_later_one():
    async def scenario():
        pipeline = StagePipeline(PLACE)
        stage = await pipeline.load(HungStage)
        answers = [pipeline.submit(StageStep(StepPlan(i, ()))) for i in range(3)]
        await asyncio.sleep(0.1)
        assert not any(a.done() for a in answers)  # one step runs (blocked), two wait behind it

        pipeline.fail(Unavailable("tp rank 1 of stage c0-s0 died (exit code -9)"))
        got = [(a.result().step_id, a.result().error.code, a.result().error.message) for a in answers]
        later = pipeline.submit(StageStep(StepPlan(9, ())))
        assert later.done() and later.result().error.code == "UNAVAILABLE"

        stage.release.set()
        await pipeline.close()
        return got

    got = asyncio.run(scenario())
    assert got == [(i, "UNAVAILABLE", "tp rank 1 of stage c0-s0 died (exit code -9)") for i in range(3)]


class ThreadRecordingStage(StubStage):
    """Records the thread that builds it and the threads that step it."""

    def __init__(self) -> None:
        self.built_on = threading.get_ident()
        self.stepped_on: list[int] = []

    def step(self, step):
        self.stepped_on.append(threading.get_ident())
        raise RuntimeError("no model here")  # answered as a failed step; only the thread matters


def test_the_stage_is_built_on_the_thread_that_steps_it():
    # One OpenMP team per process: see stagemesh.model.torch_thread.
    async def scenario():
        pipeline = StagePipeline(PLACE)
        stage = await pipeline.load(ThreadRecordingStage)
        answers = [pipeline.submit(StageStep(StepPlan(i, ()))) for i in range(3)]
        await asyncio.gather(*answers)
        await pipeline.close()
        return stage

    stage = asyncio.run(scenario())
    assert len(stage.stepped_on) == 3
    assert set(stage.stepped_on) == {stage.built_on} and stage.built_on != threading.get_ident()
