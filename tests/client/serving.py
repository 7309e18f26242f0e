"""A fake ``stagemesh.v1.Gateway`` servicer served by a real grpc.aio server on an ephemeral
127.0.0.1 port, on an event loop thread of its own (the SDK's blocking client calls it from the
test's thread)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc.aio

from stagemesh.v1 import gateway_pb2_grpc


@contextmanager
def serving(servicer: gateway_pb2_grpc.GatewayServicer) -> Iterator[str]:
    """Yields the address ``servicer`` answers on; stops the server and its loop afterwards."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
