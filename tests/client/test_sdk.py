"""The client SDK against a real grpc.aio server on an ephemeral 127.0.0.1 port.

The server is a small fake Gateway defined here: these tests pin the SDK's behaviour
(assembly of streamed chunks, error mapping, deadlines, cancellation), not the system's.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time

import grpc
import grpc.aio
import pytest

import stagemesh
from stagemesh import AsyncClient, Client, GenerateResult, StagemeshError
from stagemesh.errors import DeadlineExceeded, InvalidArgument, Unavailable
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.client.serving import serving


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Generates ``last input id + 1, + 2, ...`` (token ids) or ``len(prompt) + 1, ...`` (text).

    Chunks come as [t0], [t1, t2], [t3], ...; each chunk's text is ``<t>`` per token. Token-id
    requests end on the last token's chunk ("length"); text requests end with an extra
    message that carries no token ("stop"). Prompts "slow" and "endless" never finish.
    """

    def __init__(self):
        self.requests: list[gateway_pb2.GenerateRequest] = []
        self.client_left = threading.Event()
        self.running = {"r-live"}

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.WhichOneof("input") == "prompt" and not request.prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: send text or token ids")
        if request.prompt == "slow":
            await asyncio.sleep(30)
        rid = request.request_id or "gw-1"
        if request.prompt == "endless":
            async for msg in self._endless(rid):
                yield msg
            return
        by_ids = request.WhichOneof("input") == "token_ids"
        base = request.token_ids.ids[-1] if by_ids else len(request.prompt)
        tokens = [base + 1 + i for i in range(request.params.max_new_tokens)]
        index = 0
        for size in _chunk_sizes(len(tokens)):
            chunk = tokens[index : index + size]
            last = index + size == len(tokens)
            yield gateway_pb2.GenerateResponse(
                request_id=rid, token_ids=chunk, index=index, text="".join(f"<{t}>" for t in chunk),
                finish_reason="length" if last and by_ids else "",
            )
            index += size
        if not by_ids:
            yield gateway_pb2.GenerateResponse(request_id=rid, index=index, finish_reason="stop")

    async def _endless(self, rid):
        try:
            for i in range(10_000):
                yield gateway_pb2.GenerateResponse(request_id=rid, token_ids=[i], index=i)
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, GeneratorExit):
            # the call ended under it: cancelled in its sleep, or closed at a yield (while gRPC
            # wrote the message, the generator is suspended there and the cancellation hits gRPC's
            # consumer: the generator then ends with GeneratorExit; a CI run saw that race)
            self.client_left.set()
            raise

    async def Cancel(self, request, context):
        cancelled = request.request_id in self.running
        self.running.discard(request.request_id)
        return gateway_pb2.CancelResponse(cancelled=cancelled)

    async def Status(self, request, context):
        load = gateway_pb2.WorkerLoad(queue_depth=2, kv_blocks_used=10, kv_blocks_total=512)
        return gateway_pb2.StatusResponse(
            chains=[gateway_pb2.ChainStatus(id=0, healthy=True, num_stages=2, requests_served=7)],
            workers=[
                gateway_pb2.WorkerStatus(
                    role="stage", chain=0, stage=1, layer_start=4, layer_end=8, address="127.0.0.1:6001",
                    pid=4242, device="cpu", healthy=True, tp_size=1, load=load,
                ),
                gateway_pb2.WorkerStatus(role="expert", chain=-1, stage=-1, healthy=False,
                                         layer_experts={1: gateway_pb2.ExpertIds(ids=[0, 1])}),
            ],
            model="tiny",
            json='{"bubble_fraction": 0.25}',
        )


def _chunk_sizes(n: int) -> list[int]:
    sizes = [1, 2] + [1] * n
    out, total = [], 0
    for s in sizes:
        if total >= n:
            break
        out.append(min(s, n - total))
        total += out[-1]
    return out


GATEWAYS: dict[str, FakeGateway] = {}


@pytest.fixture(scope="module")
def gateway():
    """(address, servicer) of the fake gateway, served on its own event loop thread."""
    servicer = FakeGateway()
    with serving(servicer) as addr:
        GATEWAYS[addr] = servicer
        yield addr, servicer


@pytest.fixture
def client(gateway):
    with Client(gateway[0], timeout=10) as c:
        yield c


# --- blocking client -----------------------------------------------------------------------


def test_generate_assembles_multi_token_chunks(client):
    result = client.generate(token_ids=[1, 2, 3], max_new_tokens=5, request_id="r-7")
    assert result == GenerateResult(
        request_id="r-7", token_ids=(4, 5, 6, 7, 8), text="<4><5><6><7><8>", finish_reason="length"
    )


def gateway_last_request(client) -> gateway_pb2.GenerateRequest:
    return GATEWAYS[client.addr].requests[-1]


def test_generate_from_prompt_ends_on_a_token_free_message(client):
    result = client.generate("hi", max_new_tokens=3)
    sent = gateway_last_request(client)
    assert sent.request_id and sent.params.HasField("seed")  # resumable: an id and a seed of the SDK's own
    assert result == GenerateResult(request_id=sent.request_id, token_ids=(3, 4, 5), text="<3><4><5>",
                                    finish_reason="stop")


def test_a_list_prompt_is_taken_as_token_ids(client, gateway):
    assert client.generate([9], max_new_tokens=1).token_ids == (10,)
    assert list(gateway[1].requests[-1].token_ids.ids) == [9]


def test_stream_yields_one_item_per_token(client):
    items = [(t.token_id, t.text, t.index, t.finish_reason) for t in client.stream(token_ids=[1], max_new_tokens=4)]
    assert items == [(2, "<2>", 0, None), (3, "", 1, None), (4, "<3><4>", 2, None), (5, "<5>", 3, "length")]
    end = list(client.stream("ab", max_new_tokens=1))[-1]
    assert (end.token_id, end.index, end.finish_reason) == (None, 1, "stop")


def test_sampling_params_reach_the_gateway(client, gateway):
    client.generate("x", max_new_tokens=2, temperature=0.7, top_k=40, top_p=0.9, seed=0, stop_token_ids=[2, 7])
    sent = gateway[1].requests[-1]
    assert sent.params.HasField("seed") and sent.params.seed == 0
    assert (sent.params.max_new_tokens, sent.params.temperature, sent.params.top_k) == (2, 0.7, 40)
    assert sent.params.top_p == 0.9 and list(sent.params.stop_token_ids) == [2, 7]
    client.generate("x", max_new_tokens=1)
    client.generate("x", max_new_tokens=1)
    seeds = [r.params.seed for r in gateway[1].requests[-2:]]
    assert all(r.params.HasField("seed") for r in gateway[1].requests[-2:]) and seeds[0] != seeds[1]  # drawn, per call


def test_invalid_argument_status_becomes_invalid_argument(client):
    with pytest.raises(InvalidArgument) as info:
        client.generate("")
    err = info.value
    assert err.code == "INVALID_ARGUMENT" and err.message == "prompt is empty: send text or token ids"
    assert not isinstance(err, grpc.RpcError) and err.__cause__ is None and err.__suppress_context__


@pytest.mark.parametrize(
    "kwargs", [{}, {"prompt": "a", "token_ids": [1]}, {"prompt": [1], "token_ids": [1]}, {"token_ids": ["x"]}]
)
def test_bad_input_fails_locally(client, gateway, kwargs):
    sent = len(gateway[1].requests)
    with pytest.raises(InvalidArgument):
        client.generate(**kwargs)
    with pytest.raises(InvalidArgument):
        client.stream(**kwargs)
    assert len(gateway[1].requests) == sent


def test_deadlines_become_deadline_exceeded(gateway):
    with Client(gateway[0], timeout=0.3) as short:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            short.generate("slow")
        with pytest.raises(DeadlineExceeded):
            list(short.stream("endless"))
        assert time.monotonic() - start < 5
    with Client(gateway[0]) as plain, pytest.raises(DeadlineExceeded):
        plain.generate("slow", timeout=0.2)


def test_leaving_a_stream_cancels_the_call(client, gateway):
    gateway[1].client_left.clear()
    for item in client.stream("endless"):
        if item.index == 2:
            break
    assert gateway[1].client_left.wait(5), "the server never saw the client leave"


def test_cancel_and_status(client):
    assert client.cancel("r-live") is True
    assert client.cancel("r-unknown") is False
    doc = client.status()
    assert doc["chains"] == [{"id": 0, "healthy": True, "num_stages": 2, "requests_served": 7,
                              "requests_running": 0, "requests_waiting": 0}]
    stage, expert = doc["workers"]
    assert stage["role"] == "stage" and stage["layers"] == [4, 8] and stage["address"] == "127.0.0.1:6001"
    assert (stage["pid"], stage["device"], stage["healthy"], stage["tp_size"]) == (4242, "cpu", True, 1)
    assert stage["load"]["kv_blocks_total"] == 512 and stage["load"]["queue_depth"] == 2
    assert (expert["role"], expert["chain"], expert["experts"], expert["healthy"]) == ("expert", -1, {"1": [0, 1]}, False)
    assert doc["model"] == "tiny" and doc["bubble_fraction"] == 0.25


def test_no_server_is_unavailable():
    with Client("127.0.0.1:1", timeout=5) as nowhere:
        with pytest.raises(Unavailable):
            nowhere.status()
        with pytest.raises(Unavailable):
            nowhere.generate("hi")


# --- asyncio client ------------------------------------------------------------------------


def test_async_client(gateway):
    async def main():
        async with AsyncClient(gateway[0], timeout=10) as aclient:
            result = await aclient.generate(token_ids=[1, 2, 3], max_new_tokens=5)
            assert result.token_ids == (4, 5, 6, 7, 8) and result.text == "<4><5><6><7><8>"
            items = [t async for t in aclient.stream(token_ids=[1], max_new_tokens=4)]
            assert [(t.token_id, t.index, t.finish_reason) for t in items][-2:] == [(4, 2, None), (5, 3, "length")]
            with pytest.raises(InvalidArgument, match="prompt is empty"):
                await aclient.generate("")
            with pytest.raises(InvalidArgument):
                aclient.stream(prompt="a", token_ids=[1])
            with pytest.raises(DeadlineExceeded):
                await aclient.generate("slow", timeout=0.2)
            assert await aclient.cancel("r-unknown") is False
            assert (await aclient.status())["workers"][0]["layers"] == [4, 8]

    asyncio.run(main())


def test_async_stream_closed_early_cancels_the_call(gateway):
    gateway[1].client_left.clear()

    async def main():
        async with AsyncClient(gateway[0], timeout=10) as aclient:
            async with contextlib.aclosing(aclient.stream("endless")) as items:
                async for item in items:
                    if item.index == 2:
                        break

    asyncio.run(main())
    assert gateway[1].client_left.wait(5), "the server never saw the client leave"


def test_async_no_server_is_unavailable():
    async def main():
        async with AsyncClient("127.0.0.1:1", timeout=5) as aclient:
            with pytest.raises(Unavailable) as info:
                await aclient.status()
            assert isinstance(info.value, StagemeshError) and not isinstance(info.value, grpc.RpcError)

    asyncio.run(main())


# --- import surface ------------------------------------------------------------------------


def test_import_stagemesh_does_not_import_torch():
    code = (
        "import sys, stagemesh\n"
        "assert 'torch' not in sys.modules and 'grpc' not in sys.modules, 'bare import pulls heavy modules'\n"
        "from stagemesh import Client, AsyncClient, GenerateResult, StagemeshError, InvalidArgument\n"
        "import stagemesh.wire.codec\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_public_surface():
    assert stagemesh.__version__ and "Client" in stagemesh.__all__ and "AsyncClient" in dir(stagemesh)
    assert stagemesh.InvalidArgument is InvalidArgument
