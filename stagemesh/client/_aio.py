"""The asyncio client of a stagemesh gateway (grpc.aio)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import grpc
import grpc.aio

from stagemesh.client._common import (
    CHANNEL_OPTIONS,
    RESUME_S,
    UNARY_TIMEOUT,
    StreamCursor,
    assemble,
    channel_credentials,
    deadline,
    gateway_errors,
    generate_request,
    key_metadata,
)
from stagemesh.client._common import with_sampling_doc as sampling_doc
from stagemesh.client._types import GeneratedToken, GenerateResult
from stagemesh.v1 import gateway_pb2, gateway_pb2_grpc
from stagemesh.wire.codec.messages import status_from_pb


class AsyncClient:
    """The asyncio twin of ``stagemesh.Client``: same calls, same errors, awaited.

    Create it inside a running event loop; ``async with AsyncClient(addr) as client: ...``.
    """

    def __init__(self, addr: str, *, timeout: float | None = None, resume_s: float = RESUME_S,
                 api_key: str | None = None, ca_file: str | Path | None = None, tls: bool = False):
        self.addr = addr
        self.timeout = timeout
        self.resume_s = resume_s
        self._reached = False
        """A call of this client got an answer: a server was there (``StreamCursor.fail_fast``)."""
        self._metadata = key_metadata(api_key)
        credentials = channel_credentials(ca_file, tls)
        self._channel = (grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) if credentials is None
                         else grpc.aio.secure_channel(addr, credentials, options=CHANNEL_OPTIONS))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    @sampling_doc
    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        token_ids: Sequence[int] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> GenerateResult:
        """Generates from a text ``prompt`` or from ``token_ids`` (exactly one) and waits for the end."""
        items = self.stream(
            prompt, token_ids, request_id=request_id, timeout=timeout, **sampling
        )
        return assemble([item async for item in items], request_id)

    @sampling_doc
    def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        token_ids: Sequence[int] | None = None,
        *,
        request_id: str | None = None,
        resume_from: int | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[GeneratedToken]:
        """Like ``generate``, but an async iterator of each token as it comes.

        Closing it early (``contextlib.aclosing``) cancels the request on the gateway. The
        arguments are checked when this is called, before anything is sent. A broken stream
        resumes by itself as ``stagemesh.Client.stream`` describes.
        """
        request = generate_request(prompt, token_ids, request_id=request_id, resume_from=resume_from, **sampling)
        return self._stream(request, deadline(timeout, self.timeout, None))

    async def _stream(self, request: gateway_pb2.GenerateRequest, timeout: float | None) -> AsyncIterator[GeneratedToken]:
        cursor = StreamCursor(request, timeout, self.resume_s, address=self.addr, fail_fast=not self._reached)
        while True:
            call = self._stub.Generate(cursor.request, timeout=cursor.timeout(), metadata=self._metadata)
            try:
                async for msg in call:
                    self._reached = True
                    for item in cursor.fresh(msg):
                        yield item
                return
            except grpc.RpcError as err:
                wait = cursor.retry_in(err)  # raises unless the stream is to be resumed
            finally:
                call.cancel()  # a no-op once the stream has ended
            await asyncio.sleep(wait)

    async def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Cancels a running request; False when the gateway knows no running request of that id."""
        request = gateway_pb2.CancelRequest(request_id=request_id)
        timeout = deadline(timeout, self.timeout, UNARY_TIMEOUT)
        with gateway_errors(self.addr, timeout):
            reply = await self._stub.Cancel(request, timeout=timeout, metadata=self._metadata)
        self._reached = True
        return reply.cancelled

    async def status(self, *, timeout: float | None = None) -> dict:
        """The status document; see ``stagemesh.Client.status``."""
        request = gateway_pb2.StatusRequest()
        timeout = deadline(timeout, self.timeout, UNARY_TIMEOUT)
        with gateway_errors(self.addr, timeout):
            reply = await self._stub.Status(request, timeout=timeout, metadata=self._metadata)
        self._reached = True
        return status_from_pb(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
