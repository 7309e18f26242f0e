"""A frontend's HTTP port (``--http-port``), shared by every frontend of the mesh (SO_REUSEPORT):
the OpenAI-compatible API (``frontend.openai_http``) and, with ``--gateway-http``, the gateway's
dashboard and ``/metrics`` passed through (``frontend.gateway_proxy``).

Every refusal is OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``) with
its HTTP status, also for a path or method the API does not have.
"""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from frontend.auth import require_api_key
from frontend.gateway_proxy import GatewayProxy
from frontend.openai_http import OpenAIApi
from frontend.openai_protocol import ApiError
from stagemesh.errors import StagemeshError
from stagemesh.runtime.api_keys import NO_KEYS, ApiKeys
from stagemesh.runtime.startup import StartupError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
"""A request body at most (aiohttp's default is 1 MiB). NOTE: a prompt is the body's bulk; the
gRPC path takes multi-megabyte prompts (tokenized off the loop), and JSON escaping can double
a text's size."""


@web.middleware
async def errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """ApiError, a mesh error, or aiohttp's own 404 / 405 / 413 -> OpenAI's error JSON."""
    try:
        return await handler(request)
    except ApiError as err:
        return web.json_response(err.body(), status=err.status, headers=err.headers)
    except StagemeshError as err:
        api = ApiError.from_mesh(err)
        return web.json_response(api.body(), status=api.status, headers=api.headers)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = err.reason.lower().replace(" ", "_")
        api = ApiError(err.status, f"{request.method} {request.path}: {err.reason}", code=code)
        return web.json_response(api.body(), status=err.status)


def build_app(api: OpenAIApi, proxy: GatewayProxy | None = None, keys: ApiKeys = NO_KEYS) -> web.Application:
    """The routes; with ``keys``, every path but the open ones needs one of them (``frontend.auth``)."""
    guard = [require_api_key(keys)] if keys.enabled else []
    app = web.Application(middlewares=[errors_as_json, *guard], client_max_size=MAX_BODY_BYTES)
    api.add_routes(app)
    if proxy is not None:
        proxy.add_routes(app)
    return app


class HttpServer:
    """The app on ``host:port`` with SO_REUSEPORT; a client that disconnects cancels its handler."""

    def __init__(self, api: OpenAIApi, proxy: GatewayProxy | None, grace_s: float, keys: ApiKeys = NO_KEYS):
        self.api, self.proxy = api, proxy
        self.runner = web.AppRunner(build_app(api, proxy, keys), access_log=None, handler_cancellation=True,
                                    shutdown_timeout=grace_s)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen (HTTPS with ``ssl_context``); StartupError when the port is taken by a process that does not share it."""
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, host, port, reuse_port=True, ssl_context=ssl_context).start()
        except OSError as err:
            await self.runner.cleanup()
            raise StartupError(f"cannot listen on {host}:{port} for HTTP ({err}); is another process using it?"
                               ) from err
        log.info("HTTP (OpenAI API%s) on %s:%d", ", gateway pages" if self.proxy else "", host, port)

    async def stop(self) -> None:
        """Stop listening; open calls get ``grace_s`` to finish, then are cancelled."""
        await self.runner.cleanup()
        if self.proxy is not None:
            await self.proxy.close()
        self.api.close()
