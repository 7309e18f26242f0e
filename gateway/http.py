"""The gateway's small HTTP side: ``GET /api/status`` (the status document) and ``GET /healthz``."""

from __future__ import annotations

from aiohttp import web

from .status import StatusReporter


def build_app(status: StatusReporter) -> web.Application:
    async def api_status(request: web.Request) -> web.Response:
        return web.json_response(await status.document())

    async def healthz(request: web.Request) -> web.Response:
        if status.ready:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="starting or draining\n")

    app = web.Application()
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/healthz", healthz)
    return app


async def start_http(status: StatusReporter, host: str, port: int) -> web.AppRunner:
    """Serve the app on ``host:port``; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(build_app(status), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
