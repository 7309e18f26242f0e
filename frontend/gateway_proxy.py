"""The gateway's HTTP pages, passed through a frontend's HTTP port.

``stagemesh up --http-port P`` gives P to the frontends (the OpenAI API) and the gateway a private
HTTP port; each frontend forwards the gateway's pages from P, so the dashboard, ``/metrics`` and
the OpenAI API share one address:

    GET /  /static/...  /api/status  /api/history  /api/timeline  /metrics  /healthz
                                                          -> the same path on the gateway

GET only; the status, headers and body come back as the gateway sent them (compressed bodies
untouched). A gateway that does not answer (restarting, say) gets 503 with a message.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

PATHS = ("/", "/api/status", "/api/history", "/api/timeline", "/metrics", "/healthz")
STATIC = "/static/{tail:.*}"
TIMEOUT_S = 10.0
"""A page's deadline: /api/status reads Redis and asks every worker, well under a second when healthy."""
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "content-length"})
"""Headers that belong to one connection (RFC 9110 §7.6.1), not to the page; aiohttp sets its own."""


class GatewayProxy:
    """Forwards the gateway's pages from ``address`` (``host:port`` of its HTTP side)."""

    def __init__(self, address: str):
        self.address = address
        self._session: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        for path in (*PATHS, STATIC):
            app.router.add_get(path, self.forward)

    async def forward(self, request: web.Request) -> web.Response:
        url = f"http://{self.address}{request.rel_url}"
        try:
            async with self._client().get(url, headers=_headers(request.headers), allow_redirects=False) as reply:
                body = await reply.read()
                headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
                return web.Response(status=reply.status, headers=headers, body=body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            why = f"{type(err).__name__}: {err}"
            return web.Response(status=503, text=f"the gateway's HTTP side at {self.address} did not answer ({why}); "
                                                 "it may be restarting: retry shortly\n")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                                                  auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


CREDENTIALS = frozenset({"host", "authorization", "x-api-key", "cookie"})
"""Request headers not passed on: the client's API key is checked here and stays here."""


def _headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP | CREDENTIALS}
