"""The SDK resumes a stream broken by UNAVAILABLE from the first token it has not yielded, on a
real grpc.aio server whose streams break the way a dying frontend's do; every other status is final."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from stagemesh import AsyncClient, Client
from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.client.serving import serving

TOKENS = list(range(100, 120))


class BreakingFrontend(gateway_pb2_grpc.GatewayServicer):
    """Streams ``TOKENS`` one per message. A call breaks UNAVAILABLE after ``break_after``
    messages while ``breaks`` is positive. A resumed call re-sends from two tokens before the
    asked index (a resend the SDK must drop). Prompt "bad" is INVALID_ARGUMENT after 2 tokens,
    prompt "final" UNAVAILABLE with gRPC's "do not retry" pushback."""

    def __init__(self, breaks: int, break_after: int = 3):
        self.breaks, self.break_after = breaks, break_after
        self.calls: list[gateway_pb2.GenerateRequest] = []

    async def Generate(self, request, context):
        self.calls.append(gateway_pb2.GenerateRequest.FromString(request.SerializeToString()))
        start = max(0, request.resume_from - 2) if request.HasField("resume_from") else 0
        for sent, i in enumerate(range(start, len(TOKENS))):
            if sent == self.break_after and self.breaks > 0:
                self.breaks -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed")
            if request.prompt == "bad" and i == 2:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a bad one")
            if request.prompt == "final" and i == 2:  # the mesh's verdict: do not retry
                context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy chain")
            yield gateway_pb2.GenerateResponse(request_id=request.request_id, token_ids=[TOKENS[i]], index=i,
                                               finish_reason="length" if i == len(TOKENS) - 1 else "")


@pytest.fixture
def frontend(request):
    servicer = BreakingFrontend(*request.param)
    with serving(servicer) as addr:
        yield addr, servicer


@pytest.mark.parametrize("frontend", [(3,)], indirect=True)
def test_a_stream_broken_three_times_yields_every_token_once(frontend):
    addr, servicer = frontend
    with Client(addr, timeout=20) as client:
        items = list(client.stream("hi", max_new_tokens=20))
    assert [t.token_id for t in items] == TOKENS and [t.index for t in items] == list(range(20))
    first, *resumes = servicer.calls
    assert len(resumes) == 3 and not first.HasField("resume_from")
    assert [r.resume_from for r in resumes] == [3, 4, 5]  # from the first token not yet yielded (resends dropped)
    assert {r.request_id for r in servicer.calls} == {first.request_id} and first.request_id
    assert {r.params.seed for r in servicer.calls} == {first.params.seed}  # the same request, the same seed


@pytest.mark.parametrize("frontend", [(3,)], indirect=True)
def test_the_async_client_resumes_too(frontend):
    addr, servicer = frontend

    async def main():
        async with AsyncClient(addr, timeout=20) as client:
            return await client.generate(token_ids=[1, 2], max_new_tokens=20, request_id="mine")

    result = asyncio.run(main())
    assert result.token_ids == tuple(TOKENS) and result.finish_reason == "length"
    assert [r.request_id for r in servicer.calls] == ["mine"] * 4


@pytest.mark.parametrize("frontend", [(1000, 0)], indirect=True)
def test_resuming_gives_up_after_resume_s_and_other_errors_are_final(frontend):
    addr, servicer = frontend
    with Client(addr, timeout=20, resume_s=0.5) as client:
        with pytest.raises(Unavailable, match="Stream removed"):
            client.generate("hi", max_new_tokens=20)
        attempts = len(servicer.calls)
        servicer.breaks = 0
        with pytest.raises(InvalidArgument, match="a bad one"):
            client.generate("bad", max_new_tokens=20)
        with pytest.raises(Unavailable, match="no healthy chain"):
            client.generate("final", max_new_tokens=20)
    assert 3 <= attempts <= 12  # backed off (50 ms doubling to 0.25 s), not a hot loop
    assert len(servicer.calls) == attempts + 2  # INVALID_ARGUMENT and a "do not retry" are not retried
