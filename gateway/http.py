"""The gateway's HTTP side (``--http-port``).

    GET /             the per-stage health dashboard (gateway/static/index.html; its script polls
                      /api/status every second and redraws, no reload)
    GET /static/...   the dashboard's script and style sheet (no build step, nothing from a CDN)
    GET /api/status   the status document, the same one as ``stagemesh status --json``
    GET /metrics      Prometheus text (gateway.metrics)
    GET /healthz      200 "ok" while the gateway serves, 503 while starting, draining, or while no
                      chain can serve (the body says why)
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.status import StatusReporter

STATIC = Path(__file__).resolve().parent / "static"


def build_app(status: StatusReporter, metrics: GatewayMetrics | None = None) -> web.Application:
    metrics = metrics or GatewayMetrics()

    async def dashboard(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def api_status(request: web.Request) -> web.Response:
        return web.json_response(await status.document(), headers={"Cache-Control": "no-store"})

    async def prometheus(request: web.Request) -> web.Response:
        body = await metrics.render(status.store, status.router)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        if not status.ready:
            return web.Response(status=503, text="starting or draining\n")
        if not status.router.can_serve:
            return web.Response(status=503, text=f"{status.router.why_unavailable()}\n")
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/", dashboard)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/healthz", healthz)
    return app


async def start_http(
    status: StatusReporter, host: str, port: int, metrics: GatewayMetrics | None = None
) -> web.AppRunner:
    """Serve the app on ``host:port``; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(build_app(status, metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
