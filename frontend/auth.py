"""API keys at a frontend's doors (``stagemesh.runtime.api_keys`` holds the keys and the check).

- gRPC (``stagemesh.v1.Gateway`` and KServe v2 on the client port): ``ApiKeyInterceptor``. The
  key comes as call metadata ``authorization: Bearer KEY``, or ``x-api-key: KEY`` (what Triton /
  KServe clients tend to send). A call without a valid key gets UNAUTHENTICATED before its
  request is even decoded: nothing reaches the gateway.
- HTTP (the OpenAI API and the gateway's pages passed through): ``require_api_key``, a
  middleware; ``Authorization: Bearer KEY``, or HTTP Basic with the key as the password (so a
  browser can open the dashboard: it asks once and sends it with the page's own calls). A
  refusal is 401 with OpenAI's error JSON (``invalid_api_key``, as OpenAI answers a bad key).

What stays open, for probes that carry no key: ``grpc.health.v1`` and KServe's ``ServerLive`` /
``ServerReady`` (both say only whether the server serves); over HTTP ``/health``, ``/healthz``
and ``/version``. NOTE: ``/metrics`` is NOT open (vLLM leaves it open): passed through a client
port it shows every worker's address and load to anyone who can reach that port. A Prometheus
on the mesh's own network scrapes the gateway's private HTTP port, which has no key
(``deploy/prometheus.yml``); one that scrapes the client port sends the key
(``authorization: {credentials_file: ...}`` in its scrape config).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable

import grpc
import grpc.aio

from frontend.openai_protocol import ApiError
from stagemesh.runtime.api_keys import ENV_KEY, ApiKeys

log = logging.getLogger(__name__)

OPEN_GRPC = ("/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
             "/inference.GRPCInferenceService/ServerReady")
"""Methods (or a service's prefix) any caller may call."""
OPEN_HTTP = frozenset({"/health", "/healthz", "/version"})
"""Paths any caller may get (probes, load balancers)."""
HOW_GRPC = ("send the call metadata `authorization: Bearer <key>` (or `x-api-key: <key>`); the stagemesh SDK takes "
            f"api_key= (default: ${ENV_KEY}), the CLI --api-key")
HOW_HTTP = ("send the header `Authorization: Bearer <key>` (the openai client: api_key= or $OPENAI_API_KEY; "
            "a browser: the key as the password)")


def refusal(keys: ApiKeys, presented: Iterable[str]) -> str | None:
    """Why a call with the keys ``presented`` is refused (None: it is let in). One valid key is enough."""
    presented = [k for k in presented if k]
    if not presented:
        return "this stagemesh server requires an API key and the call carried none"
    found = False
    for key in presented:  # every one checked, so the time taken does not say which was valid
        found |= keys.accepts(key)
    return None if found else "the API key is not valid for this stagemesh server"


def _bearer(value: str | None) -> str | None:
    """KEY of ``Bearer KEY`` (the scheme in any case), else None."""
    scheme, _, key = (value or "").strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def _basic_password(value: str | None) -> str | None:
    """The password of ``Basic base64(user:password)``, else None."""
    scheme, _, blob = (value or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(blob.strip(), validate=True).decode().partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return None


# --- gRPC ------------------------------------------------------------------------------------


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED, saying how to send a key, for every call but the open ones (``OPEN_GRPC``)
    that does not carry one of ``keys``."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC):
            return handler
        metadata = dict(details.invocation_metadata or ())
        why = refusal(self.keys, (_bearer(metadata.get("authorization")), metadata.get("x-api-key")))
        if why is None:
            return handler
        log.debug("refused %s: %s", details.method, why)
        return _refusing(handler, f"{why}: {HOW_GRPC}")


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that aborts UNAUTHENTICATED; the request is left undecoded."""

    async def deny(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def interceptors(keys: ApiKeys) -> tuple[grpc.aio.ServerInterceptor, ...]:
    """The client port's interceptors: the key check when keys are given, else none (no cost per call)."""
    return (ApiKeyInterceptor(keys),) if keys.enabled else ()


# --- HTTP ------------------------------------------------------------------------------------


def require_api_key(keys: ApiKeys):
    """The aiohttp middleware: 401 (OpenAI's error JSON) on every path but ``OPEN_HTTP`` without a valid key."""
    from aiohttp import web  # only a frontend that serves HTTP imports aiohttp (``Frontend._start_http``)

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if request.path in OPEN_HTTP:
            return await handler(request)
        header = request.headers.get("Authorization")
        why = refusal(keys, (_bearer(header), _basic_password(header)))
        if why is None:
            return await handler(request)
        # /v1: a bearer-token API; elsewhere the dashboard, which a browser opens: ask for Basic there
        challenge = 'Bearer realm="stagemesh"' if request.path.startswith("/v1/") else 'Basic realm="stagemesh"'
        raise ApiError(401, f"{why}: {HOW_HTTP}", code="invalid_api_key", headers={"WWW-Authenticate": challenge})

    return middleware
