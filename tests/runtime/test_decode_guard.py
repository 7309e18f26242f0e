"""Undecodable requests get INVALID_ARGUMENT from every kind of handler a server registers
(``stagemesh.runtime.decode_guard``), on a real server and port."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from stagemesh.runtime.decode_guard import DecodeGuard, Undecodable, in_band_decode_errors
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc, scheduling_pb2, scheduling_pb2_grpc

CORRUPT = b"\xff\xff\xff"  # a truncated field tag: no message at all
BAD_UTF8 = b"\x12\x02\xff\xfe"  # GenerateRequest.prompt (field 2) that is not UTF-8
RAW = {"request_serializer": lambda m: m if isinstance(m, bytes) else m.SerializeToString()}


class Frontend(gateway_pb2_grpc.GatewayServicer):
    async def Generate(self, request, context):  # unary request, response stream
        yield gateway_pb2.GenerateResponse(request_id=request.request_id)

    async def Status(self, request, context):  # unary
        return gateway_pb2.StatusResponse(model="m")


class Scheduling(scheduling_pb2_grpc.SchedulingServicer):
    """Connect reads its requests on another task, as the gateway's does."""

    def __init__(self):
        self.seen: list[object] = []

    async def Connect(self, requests, context):
        async def read():
            async for batch in requests:
                self.seen.append(batch)
        await asyncio.ensure_future(read())
        for _ in self.seen:
            yield scheduling_pb2.EventBatch()


class InBandScheduling(Scheduling):
    @in_band_decode_errors
    async def Connect(self, requests, context):
        async for answer in Scheduling.Connect(self, requests, context):
            yield answer


async def _serve(*servicers) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    guarded = DecodeGuard(server)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicers[0], guarded)
    scheduling_pb2_grpc.add_SchedulingServicer_to_server(servicers[1], guarded)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _status(call) -> tuple[grpc.StatusCode, str]:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError:
        pass
    return await call.code(), await call.details()


def test_unary_and_streaming_requests_that_cannot_be_decoded_get_invalid_argument():
    async def body():
        server, address = await _serve(Frontend(), Scheduling())
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                generate = channel.unary_stream("/stagemesh.v1.Gateway/Generate", **RAW)
                status = channel.unary_unary("/stagemesh.v1.Gateway/Status", **RAW)
                connect = channel.stream_stream("/stagemesh.v1.Scheduling/Connect", **RAW)
                for call, message in (
                    (generate(BAD_UTF8, timeout=5), "could not decode stagemesh.v1.GenerateRequest"),
                    (status(CORRUPT, timeout=5), "could not decode stagemesh.v1.StatusRequest"),
                    (connect(iter([scheduling_pb2.FrontendBatch(), CORRUPT]), timeout=5),
                     "could not decode stagemesh.v1.FrontendBatch"),
                ):
                    code, details = await _status(call)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, (code, details)
                # and the same server goes on serving what it can decode
                assert (await status(gateway_pb2.StatusRequest(), timeout=5)) is not None
        finally:
            await server.stop(0)

    asyncio.run(body())


def test_an_in_band_handler_receives_the_undecodable_request_and_its_stream_goes_on():
    scheduling = InBandScheduling()

    async def body():
        server, address = await _serve(Frontend(), scheduling)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                connect = channel.stream_stream("/stagemesh.v1.Scheduling/Connect", **RAW)
                code, _ = await _status(connect(iter([CORRUPT, scheduling_pb2.FrontendBatch(frontend="f")]), timeout=5))
                assert code == grpc.StatusCode.OK
        finally:
            await server.stop(0)

    asyncio.run(body())
    undecodable, decoded = scheduling.seen
    assert isinstance(undecodable, Undecodable) and "could not decode stagemesh.v1.FrontendBatch" in undecodable.detail
    assert decoded.frontend == "f"


@pytest.mark.parametrize("data", [CORRUPT, BAD_UTF8])
def test_the_guarded_deserializer_never_raises(data):
    from stagemesh.runtime.decode_guard import guard_deserializer

    got = guard_deserializer(gateway_pb2.GenerateRequest.FromString)(data)
    assert isinstance(got, Undecodable) and got.message == "stagemesh.v1.GenerateRequest"
