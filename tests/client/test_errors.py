"""The SDK's errors say what to fix: which argument and its range, what a prompt may be, which
address had no server, which deadline passed. On a real grpc.aio server where one is crossed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from stagemesh import AsyncClient, Client
from stagemesh.client._common import HANDSHAKE_RETRY_S
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


class Answers(gateway_pb2_grpc.GatewayServicer):
    async def Generate(self, request, context):
        yield gateway_pb2.GenerateResponse(request_id=request.request_id, token_ids=[7], index=0,
                                           finish_reason="length")


@contextmanager
def tcp_front(address: str, closes: int = 0, delay_s: float = 0.0) -> Iterator[str]:
    """A TCP front for ``address`` on a port of its own that closes the first ``closes`` connections
    at once (as a server overloaded by a storm of connections, or a TLS port, closes them during the
    handshake) and relays the others, each from ``delay_s`` after it was accepted (a server too busy
    to send its HTTP/2 SETTINGS at once)."""
    accepted = 0

    async def relay(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        nonlocal accepted
        accepted += 1
        if accepted <= closes:
            writer.close()
            return
        await asyncio.sleep(delay_s)
        host, port = address.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, "127.0.0.1", 0), loop).result(10)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        async def stop():
            server.close()
            relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_first_call_whose_connection_is_closed_in_its_handshake_is_tried_again_before_it_fails():
    with serving(Answers()) as address:
        with tcp_front(address, closes=3) as front, Client(front, timeout=30) as client:
            assert client.generate(token_ids=[5], max_new_tokens=1).token_ids == (7,)
        with tcp_front(address, closes=10**6) as front, Client(front, timeout=30) as client:
            start = time.monotonic()
            with pytest.raises(Unavailable) as info:
                client.generate(token_ids=[5], max_new_tokens=1)
            assert HANDSHAKE_RETRY_S <= time.monotonic() - start < 10  # not the 60 s of resuming
            assert f"no stagemesh server answers at {front}" in info.value.message
            assert "may speak TLS" in info.value.message


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_a_server_slow_to_answer_a_new_connection_is_waited_for(client_class):
    """A frontend under an overload wave may take a second or more to send its SETTINGS frame: the
    connection is waited for (gRPC's own 20 s), not given up after 0.1 s (``grpc.min_reconnect_backoff_ms``
    sets that deadline: with it at 100, such calls failed UNAVAILABLE "connection attempt timed out
    before receiving SETTINGS frame")."""
    with serving(Answers()) as address, tcp_front(address, delay_s=1.0) as front:
        if client_class is Client:
            with Client(front, timeout=30) as client:
                assert client.generate(token_ids=[5], max_new_tokens=1).token_ids == (7,)
        else:
            async def one() -> tuple[int, ...]:
                async with AsyncClient(front, timeout=30) as client:
                    return (await client.generate(token_ids=[5], max_new_tokens=1)).token_ids

            assert asyncio.run(one()) == (7,)
