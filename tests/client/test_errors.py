"""The SDK's errors say what to fix: which argument and its range, what a prompt may be, which
address had no server, which deadline passed. On a real grpc.aio server where one is crossed."""

from __future__ import annotations

import asyncio
import time

import pytest

from stagemesh import AsyncClient, Client
from stagemesh.errors import DeadlineExceeded, InvalidArgument, Unavailable
from stagemesh.runtime.net import free_port
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.client.serving import serving


class Silent(gateway_pb2_grpc.GatewayServicer):
    """Answers nothing until the client's deadline passes."""

    async def Generate(self, request, context):
        await asyncio.sleep(30)
        yield gateway_pb2.GenerateResponse()

    async def Status(self, request, context):
        await asyncio.sleep(30)
        return gateway_pb2.StatusResponse()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 2**31}, "max_new_tokens=2147483648 is out of range: it must be > 0 and at most 2147483647"),
    ({"seed": 2**64}, f"seed={2**64} is out of range"),
    ({"stop_token_ids": [2**63]}, f"stop_token_ids={2**63} is out of range"),
])
def test_a_number_too_large_for_the_wire_names_its_argument_and_range(kwargs, message):
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidArgument) as info:
        client.generate("hi", **kwargs)
    assert message in info.value.message and "Value out of range" not in info.value.message


@pytest.mark.parametrize("args, kwargs, message", [
    ((123,), {}, "prompt must be a string (text) or a sequence of token ids (integers), not int 123"),
    ((None,), {"token_ids": 5}, "token_ids must be a string (text) or a sequence of token ids (integers), not int 5"),
    (([1, 2.5],), {}, "prompt[1]=2.5 is not a token id: token ids are integers"),
    ((), {"token_ids": [1, "x"]}, "token_ids[1]='x' is not a token id: token ids are integers"),
])
def test_a_prompt_of_the_wrong_type_says_what_a_prompt_may_be(args, kwargs, message):
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidArgument) as info:
        client.generate(*args, **kwargs)
    assert info.value.message == message


def test_numpy_style_integers_are_token_ids():
    from stagemesh.client._common import token_ids_of

    class Index:  # what numpy and 0-d torch integers offer
        def __index__(self):
            return 7

    assert token_ids_of([Index(), 3], "prompt") == (7, 3)


def test_no_server_names_the_address_and_asks_whether_stagemesh_up_runs_there():
    address = f"127.0.0.1:{free_port()}"
    with Client(address) as client:  # no timeout: must not wait out the 60 s of resuming
        start = time.monotonic()
        for call in (client.status, lambda: client.generate("hi")):
            with pytest.raises(Unavailable) as info:
                call()
            assert f"no stagemesh server answers at {address}: is `stagemesh up` running there" in info.value.message
            assert "Connection refused" in info.value.message  # gRPC's own text is kept, after the hint
        assert time.monotonic() - start < 5

    async def aio():
        async with AsyncClient(address) as aclient:
            with pytest.raises(Unavailable, match="is `stagemesh up` running there"):
                await aclient.generate("hi")

    asyncio.run(aio())


def test_a_deadline_says_which_deadline_passed():
    with serving(Silent()) as address, Client(address) as client:
        with pytest.raises(DeadlineExceeded) as info:
            client.generate("hi", timeout=0.3)
        assert info.value.message.startswith("no answer within 0.3 s (the call's timeout); pass a larger timeout=")
        with pytest.raises(DeadlineExceeded, match=r"no answer within 0\.2 s \(the call's timeout\)"):
            client.status(timeout=0.2)
