"""Fault injection in an expert worker: its ``Expert`` and ``Admin`` services on a real ephemeral
port, over a stub runner (each expert multiplies its rows by expert id + 1). Injected failures
and stalls act at the top of each batch on the compute thread; a drop aborts the open Run
streams; with fault injection off the Admin RPC is refused, saying how to turn it on."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from expert_worker.place import ExpertPlace
from expert_worker.servicer import ExpertServicer
from stagemesh.errors import StagemeshError
from stagemesh.runtime.faults import DropStreams, FailNext, FaultInjector, Stall, add_admin, inject_fault
from stagemesh.v1 import expert_pb2_grpc
from stagemesh.wire.codec.experts import ExpertBatch, expert_output_from_pb, expert_request_to_pb

LAYER = 1


class ScalingRunner:
    """Stands in for ``ExpertRunner``: expert ``e`` multiplies its rows by ``e + 1``."""

    def run(self, layer, expert_ids, counts, hidden):
        scale = torch.repeat_interleave(torch.tensor([e + 1.0 for e in expert_ids]), torch.tensor(list(counts)))
        return hidden * scale[:, None]


def place(worker: int = 0, address: str = "127.0.0.1:0") -> ExpertPlace:
    return ExpertPlace(chain=0, worker=worker, address=address, device="cpu", model="/nowhere", dtype=None,
                       experts={LAYER: [0, 1]})


async def serve_expert(worker: int, enabled: bool) -> tuple[grpc.aio.Server, str, ExpertServicer]:
    """An expert worker's Expert + Admin services on 127.0.0.1:<ephemeral>, with a stub runner."""
    servicer = ExpertServicer(place(worker), FaultInjector(f"expert-c0-e{worker}", enabled))
    servicer.runner = ScalingRunner()
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    add_admin(server, servicer.faults)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", servicer


async def _with_expert(enabled: bool, body):
    server, address, servicer = await serve_expert(0, enabled)
    try:
        return await body(address)
    finally:
        await server.stop(None)
        servicer.close()


def _batch(step_id: int):
    return expert_request_to_pb(ExpertBatch(step_id, LAYER, (0, 1), (1, 2), torch.ones(3, 4)))


async def _run(address: str, step_ids: range):
    async with grpc.aio.insecure_channel(address) as channel:
        call = expert_pb2_grpc.ExpertStub(channel).Run(iter([_batch(i) for i in step_ids]), timeout=10)
        return [answer async for answer in call]


def test_injected_failures_answer_the_next_batches_with_the_code():
    async def body(address):
        told = await asyncio.to_thread(inject_fault, address, FailNext(1, "INTERNAL"))
        return told, await _run(address, range(2))

    told, answers = asyncio.run(_with_expert(True, body))
    assert told == "expert-c0-e0: will fail its next 1 step(s)/call(s) with INTERNAL"
    assert answers[0].error.code == "INTERNAL" and "injected fault" in answers[0].error.message
    assert torch.equal(expert_output_from_pb(answers[1], 3)[:, 0], torch.tensor([1.0, 2.0, 2.0]))


def test_an_injected_stall_holds_each_batch_in_its_window():
    async def body(address):
        await asyncio.to_thread(inject_fault, address, Stall(stall_s=0.3, for_s=10))
        t0 = time.monotonic()
        answers = await _run(address, range(2))
        return time.monotonic() - t0, answers

    took, answers = asyncio.run(_with_expert(True, body))
    assert all(not a.HasField("error") for a in answers) and 0.6 <= took < 2.0, took


def test_an_injected_drop_aborts_the_open_run_stream_unavailable():
    async def body(address):
        async with grpc.aio.insecure_channel(address) as channel:
            call = expert_pb2_grpc.ExpertStub(channel).Run()
            await call.write(_batch(0))
            await call.read()
            told = await asyncio.to_thread(inject_fault, address, DropStreams())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
        return told, err.value

    told, err = asyncio.run(_with_expert(True, body))
    assert told == "expert-c0-e0: dropped 1 open stream(s)"
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "stream dropped" in err.details()


def test_without_the_flag_the_admin_rpc_is_refused_saying_how_to_turn_it_on():
    async def body(address):
        with pytest.raises(StagemeshError) as err:
            await asyncio.to_thread(inject_fault, address, Stall(1, 1))
        return err.value

    err = asyncio.run(_with_expert(False, body))
    assert err.code == "FAILED_PRECONDITION" and "--enable-fault-injection" in err.message
