"""Requests whose bytes are not the message they claim to be get ``INVALID_ARGUMENT``, on every server.

NOTE: gRPC's own answer to a request it cannot deserialize (corrupt wire format, invalid UTF-8
in a string field) is ``UNKNOWN`` or ``INTERNAL`` with nothing a client can act on. So every
handler a server registers goes through ``DecodeGuard``: its deserializer never raises (it
returns an ``Undecodable`` in place of the message), and

- a unary request that could not be decoded is answered ``INVALID_ARGUMENT`` "could not decode
  <Message>: ..." without calling the handler;
- on a request stream, the call is ended the same way when the handler's request iterator
  reaches one (``_stream_requests`` says how), unless the handler is marked ``in_band_decode_errors``: such a handler (a
  stage's ``Forward``, an expert worker's ``Run``) answers every request of its stream in
  band, so it receives the ``Undecodable`` and answers that one request with an error while the
  stream and its other requests go on.

Handlers that are plain functions (not coroutines or async generators) keep gRPC's behaviour:
the mesh's servers have none.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)

IN_BAND = "_stagemesh_in_band_decode_errors"


@dataclass(frozen=True)
class Undecodable:
    """What a guarded deserializer returns for bytes that are not a valid ``message``."""

    message: str
    """Full name of the expected message, e.g. ``stagemesh.v1.StageRequest``."""
    error: str
    """What the protobuf parser said."""

    @property
    def detail(self) -> str:
        return f"could not decode {self.message}: {self.error}"


def in_band_decode_errors(method: Callable) -> Callable:
    """Marks a request-streaming handler that answers an ``Undecodable`` request itself (in band)."""
    setattr(method, IN_BAND, True)
    return method


def guard_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize`` that returns an ``Undecodable`` instead of raising."""
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None) or getattr(deserialize, "__qualname__", "the request")

    def guarded(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as err:  # noqa: BLE001 - any parser failure is the sender's, answered INVALID_ARGUMENT
            return Undecodable(name, str(err) or type(err).__name__)

    return guarded


def guard_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """``handler`` with a deserializer that never raises and a behaviour that refuses an ``Undecodable``."""
    if handler is None:
        return None
    kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)
    wrap = _stream_requests if handler.request_streaming else _unary_request
    guarded_behavior = wrap(behavior)
    if guarded_behavior is None:  # a plain function: left as gRPC runs it
        return handler
    return handler._replace(request_deserializer=guard_deserializer(handler.request_deserializer),
                            **{kind: guarded_behavior})


def _unary_request(behavior: Callable) -> Callable | None:
    if inspect.isasyncgenfunction(behavior):
        async def unary_stream(request, context):
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for response in behavior(request, context):
                yield response
        return unary_stream
    if inspect.iscoroutinefunction(behavior):
        async def unary(request, context):
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            return await behavior(request, context)
        return unary
    return None


def _stream_requests(behavior: Callable) -> Callable | None:
    """NOTE: the handler may read its requests on another task (the gateway's ``Connect``
    does), and an abort from there races the handler's own answers (gRPC then ends the call
    ``INTERNAL``). So the request stream just ends at an undecodable request, as if the client
    had half-closed, and the call is aborted on the handler's own task: as soon as the handler
    yields or returns, with what it would have sent discarded."""
    if getattr(behavior, IN_BAND, False):
        return behavior
    if inspect.isasyncgenfunction(behavior):
        async def stream_stream(requests, context):
            failed: list[Undecodable] = []
            responses = behavior(_until_undecodable(requests, failed), context)
            try:
                async for response in responses:
                    if failed:
                        break
                    yield response
            except Exception:
                if not failed:
                    raise
            finally:
                await responses.aclose()
            if failed:
                await _refuse(context, failed[0])
        return stream_stream
    if inspect.iscoroutinefunction(behavior):
        async def stream_unary(requests, context):
            failed: list[Undecodable] = []
            try:
                response = await behavior(_until_undecodable(requests, failed), context)
            except Exception:
                if not failed:
                    raise
            if failed:
                await _refuse(context, failed[0])
            return response
        return stream_unary
    return None


async def _until_undecodable(requests, failed: list[Undecodable]):
    """``requests`` up to the first one that could not be decoded (then put in ``failed``)."""
    async for request in requests:
        if isinstance(request, Undecodable):
            failed.append(request)
            return
        yield request


async def _refuse(context: grpc.aio.ServicerContext, request: Undecodable) -> None:
    log.info("refused a request that could not be decoded: %s", request.detail)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.detail)


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler):
        self._inner = inner
        self._guarded: dict[int, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        guarded = self._guarded.get(id(handler))
        if guarded is None:
            guarded = self._guarded[id(handler)] = guard_handler(handler)
        return guarded


class DecodeGuard:
    """Stands in for a ``grpc.aio.Server`` while servicers add their handlers: every handler
    they add is guarded (module docstring). Anything else goes to the server itself."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        guarded = {name: guard_handler(h) for name, h in method_handlers.items()}
        self._server.add_registered_method_handlers(service_name, guarded)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
