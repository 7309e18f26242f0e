"""The blocking client of a stagemesh gateway."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc

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


class Client:
    """Talks to a stagemesh gateway at ``addr`` (``host:port``) over one gRPC channel.

    ``timeout`` (seconds) is the default deadline of every call; a call's own ``timeout``
    overrides it. Without either, Generate has no deadline and Cancel/Status get 30 s.
    A stream broken by UNAVAILABLE resumes by itself for up to ``resume_s`` seconds (``stream``).
    Every failure raises a ``stagemesh.StagemeshError`` subclass (``InvalidArgument``,
    ``DeadlineExceeded``, ``Unavailable``, ...), never a grpc type.

    ``api_key``: the key a mesh started with API keys asks for, sent with every call (default:
    the ``STAGEMESH_API_KEY`` environment variable); without a valid one every call raises
    ``Unauthenticated``, which is never retried. ``ca_file``: a PEM file of the CA that signed the
    client port's certificate, for a port that serves TLS; ``tls=True`` trusts the system's roots
    instead.
    """

    def __init__(self, addr: str, *, timeout: float | None = None, resume_s: float = RESUME_S,
                 api_key: str | None = None, ca_file: str | Path | None = None, tls: bool = False):
        self.addr = addr
        self.timeout = timeout
        self.resume_s = resume_s
        self._reached = False
        """A call of this client got an answer: a server was there (``StreamCursor.fail_fast``)."""
        """How long a stream broken by UNAVAILABLE (a frontend or the gateway went away) keeps
        resuming, from the token it stopped at, before the error is raised."""
        self._metadata = key_metadata(api_key)
        credentials = channel_credentials(ca_file, tls)
        self._channel = (grpc.insecure_channel(addr, options=CHANNEL_OPTIONS) if credentials is None
                         else grpc.secure_channel(addr, credentials, options=CHANNEL_OPTIONS))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    @sampling_doc
    def generate(
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
        return assemble(items, request_id)

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
    ) -> Iterator[GeneratedToken]:
        """Like ``generate``, but yields each token as it comes.

        Leaving the loop early (or closing the iterator) cancels the request on the gateway.
        The arguments are checked when this is called, before anything is sent.

        A stream broken by UNAVAILABLE (its frontend or the gateway went away) is resumed by
        itself, on any frontend, from the first token not yet yielded, for up to ``resume_s``
        seconds: the loop sees every token once. ``request_id`` and ``resume_from`` take up a
        request by hand (e.g. after this process restarted), with its original prompt and
        parameters (its seed included).
        """
        request = generate_request(prompt, token_ids, request_id=request_id, resume_from=resume_from, **sampling)
        return self._stream(request, deadline(timeout, self.timeout, None))

    def _stream(self, request: gateway_pb2.GenerateRequest, timeout: float | None) -> Iterator[GeneratedToken]:
        cursor = StreamCursor(request, timeout, self.resume_s, address=self.addr, fail_fast=not self._reached)
        while True:
            call = self._stub.Generate(cursor.request, timeout=cursor.timeout(), metadata=self._metadata)
            try:
                for msg in call:
                    self._reached = True
                    yield from cursor.fresh(msg)
                return
            except grpc.RpcError as err:
                wait = cursor.retry_in(err)  # raises unless the stream is to be resumed
            finally:
                call.cancel()  # a no-op once the stream has ended
            time.sleep(wait)

    def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Cancels a running request; False when the gateway knows no running request of that id."""
        request = gateway_pb2.CancelRequest(request_id=request_id)
        timeout = deadline(timeout, self.timeout, UNARY_TIMEOUT)
        with gateway_errors(self.addr, timeout):
            reply = self._stub.Cancel(request, timeout=timeout, metadata=self._metadata)
        self._reached = True
        return reply.cancelled

    def status(self, *, timeout: float | None = None) -> dict:
        """The status document: ``{"chains": [...], "workers": [...], "model": ..., "version": ...}``.

        Each worker is a dict with ``role``, ``chain``, ``stage``, ``layers`` ([start, end)),
        ``experts``, ``address``, ``pid``, ``device``, ``healthy``, ``tp_size``,
        ``heartbeat_age_s`` and ``load`` (``queue_depth``, ``running_sequences``,
        ``kv_blocks_used``, ``kv_blocks_total``, ``busy_fraction``, ``tokens_processed``,
        ``step_latency_p50_s``, ``step_latency_p99_s``, ``micro_batches_per_s``, ``tokens_per_s``,
        ``bubble_fraction``, ``bytes_sent``).
        """
        request = gateway_pb2.StatusRequest()
        timeout = deadline(timeout, self.timeout, UNARY_TIMEOUT)
        with gateway_errors(self.addr, timeout):
            reply = self._stub.Status(request, timeout=timeout, metadata=self._metadata)
        self._reached = True
        return status_from_pb(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
