"""Fault injection in a stage worker: the ``Stage`` and ``Admin`` services of one worker on a real
ephemeral port, over a ``StagePipeline`` whose stage is a stub (a last stage that samples 7).
Injected failures and stalls act at the pipeline's one seam; a drop aborts the open Forward
streams; with fault injection off the Admin RPC is refused, saying how to turn it on."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from stage_worker.pipeline import StagePipeline
from stage_worker.servicer import StageServicer
from stagemesh.errors import StagemeshError
from stagemesh.runtime.faults import DropStreams, FailNext, FaultInjector, Stall, add_admin, inject_fault
from stagemesh.serving.types import StepResult
from stagemesh.v1 import admin_pb2, admin_pb2_grpc, stage_pb2, stage_pb2_grpc
from tests.stage_worker.test_pipeline import PLACE, StubStage


class SamplingStage(StubStage):
    """A last stage that samples token 7 for every sequence."""

    def step(self, step):
        return StepResult(step.plan.step_id, {c.seq_id: 7 for c in step.plan.chunks})


def _request(step_id: int) -> stage_pb2.StageRequest:
    return stage_pb2.StageRequest(step_id=step_id)


async def _serve(enabled: bool, body):
    """One worker's Stage + Admin services on 127.0.0.1:<ephemeral>; ``body(address, injector)``."""
    injector = FaultInjector("stage-c0-s0", enabled)
    pipeline = StagePipeline(PLACE, injector.seam)
    await pipeline.load(SamplingStage)
    server = grpc.aio.server()
    stage_pb2_grpc.add_StageServicer_to_server(StageServicer(pipeline, injector.streams), server)
    add_admin(server, injector)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await body(f"127.0.0.1:{port}", injector)
    finally:
        await server.stop(None)
        await pipeline.close()


async def _steps(address: str, step_ids: range) -> list[stage_pb2.StageResponse]:
    """Send the steps on one Forward stream; their answers."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = stage_pb2_grpc.StageStub(channel).Forward(iter([_request(i) for i in step_ids]), timeout=10)
        return [answer async for answer in call]


def test_injected_failures_answer_the_next_steps_with_the_code_then_steps_run_again():
    async def body(address, injector):
        told = await asyncio.to_thread(inject_fault, address, FailNext(2))
        return told, await _steps(address, range(4))

    told, answers = asyncio.run(_serve(True, body))
    assert told == "stage-c0-s0: will fail its next 2 step(s)/call(s) with UNAVAILABLE"
    assert [(a.step_id, a.error.code) for a in answers] == [(0, "UNAVAILABLE"), (1, "UNAVAILABLE"), (2, ""), (3, "")]
    assert "injected fault: failing step/call 1 of 2" in answers[0].error.message


def test_an_injected_stall_holds_the_steps_that_start_in_its_window():
    stall = Stall(stall_s=0.5, for_s=0.8)

    async def body(address, injector):
        before = time.monotonic()
        await asyncio.to_thread(inject_fault, address, stall)
        after = time.monotonic()  # the window opened on the worker between `before` and `after`
        steps = await _timed_steps(address, range(3))
        await asyncio.sleep(max(0.0, after + stall.for_s - time.monotonic()))  # past the window
        late = await _timed_steps(address, range(3, 4))
        return before, after, steps, late

    before, after, answers, [(late_start, late_end, late)] = asyncio.run(_serve(True, body))
    assert all(not a.HasField("error") for _, _, a in answers + [(late_start, late_end, late)])
    # Each step is sent once the one before is answered, so it starts on the worker after it was
    # sent. A step that surely started inside the window is held, one that surely started after it
    # is not; the ones in between depend on when exactly the window opened, and go unchecked.
    starts = [start for start, _, _ in answers]
    held = [round(end - start, 3) for start, end, _ in answers]
    surely_in = [h for start, h in zip(starts, held) if start < before + stall.for_s]
    surely_after = [h for start, h in zip(starts, held) if start > after + stall.for_s]
    assert surely_in and all(h >= stall.stall_s for h in surely_in), (held, starts, before, after)
    assert all(h < stall.stall_s for h in surely_after), (held, starts, before, after)
    assert late_end - late_start < stall.stall_s, "a step that started after the window was held"


async def _timed_steps(address: str, step_ids: range) -> list[tuple[float, float, stage_pb2.StageResponse]]:
    """Send the steps on one Forward stream, each once the one before is answered (all at once, the
    worker would start one before its predecessor's answer reached the client): (when it was sent,
    when its answer came, the answer) for each step."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = stage_pb2_grpc.StageStub(channel).Forward(timeout=10)
        timed = []
        for i in step_ids:
            sent = time.monotonic()
            await call.write(_request(i))
            answer = await call.read()
            timed.append((sent, time.monotonic(), answer))
        await call.done_writing()
        return timed


def test_an_injected_drop_aborts_the_open_forward_stream_unavailable():
    async def body(address, injector):
        async with grpc.aio.insecure_channel(address) as channel:
            call = stage_pb2_grpc.StageStub(channel).Forward()
            await call.write(_request(0))
            first = await call.read()
            told = await asyncio.to_thread(inject_fault, address, DropStreams())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
        after = await _steps(address, range(1, 2))  # a new stream serves
        return first, told, err.value, after

    first, told, err, after = asyncio.run(_serve(True, body))
    assert first.step_id == 0 and told == "stage-c0-s0: dropped 1 open stream(s)"
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "injected fault: stream dropped" in err.details()
    assert after[0].step_id == 1 and not after[0].HasField("error")


def test_without_the_flag_the_admin_rpc_is_refused_saying_how_to_turn_it_on():
    async def body(address, injector):
        with pytest.raises(StagemeshError) as err:
            await asyncio.to_thread(inject_fault, address, FailNext(1))
        return err.value, await _steps(address, range(2))

    err, answers = asyncio.run(_serve(False, body))
    assert err.code == "FAILED_PRECONDITION"
    assert "start the worker with --enable-fault-injection (or STAGEMESH_FAULT_INJECTION=1" in err.message
    assert all(not a.HasField("error") for a in answers)  # nothing was injected


def test_a_request_naming_no_fault_is_invalid_argument():
    async def body(address, injector):
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin_pb2_grpc.AdminStub(channel).InjectFault(admin_pb2.InjectFaultRequest(), timeout=5)
        return err.value

    err = asyncio.run(_serve(True, body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "names no fault" in err.details()
