"""The gateway's HTTP side (``--http-port``).

    GET /             the per-stage health dashboard, rendered with the current values
                      (gateway.dashboard); its scripts then poll the three documents below and redraw
    GET /static/...   the dashboard's scripts and style sheet (no build step, nothing from a CDN)
    GET /api/status   the status document, the same one as ``stagemesh status --json``
    GET /api/history  the last 10 minutes per chain and per stage (gateway.history); ``?since=T``:
                      only the samples after time T
    GET /api/timeline each stage's last steps on one clock, the expert heat rows (gateway.timeline);
                      ``?window_s=S``: the last S seconds (default 1, at most 30)
    GET /metrics      Prometheus text (gateway.metrics)
    GET /healthz      200 "ok" while the gateway serves, 503 while starting, draining, or while no
                      chain can serve (the body says why); 200 "degraded: ..." while it serves but
                      refused a forged document in Redis lately (``StatusReporter.alert``)

NOTE: a forged document keeps /healthz at 200: the mesh refused it and serves the right tokens
on its signed copies, and a 503 would hand whoever can write to Redis a way to take the gateway
out of every load balancer. The body, the status document's ``alert``, the dashboard and
``stagemesh_refused_documents_total`` say it instead.
"""

from __future__ import annotations

import math
from pathlib import Path

from aiohttp import web

from gateway.dashboard import render_page
from gateway.history import History
from gateway.latencies import TokenLatencies
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.status import StatusReporter
from gateway.timeline import MAX_TIMELINE_S, TIMELINE_S, read_timeline

STATIC = Path(__file__).resolve().parent / "static"


def build_app(status: StatusReporter, metrics: GatewayMetrics | None = None,
              history: History | None = None) -> web.Application:
    metrics = metrics or GatewayMetrics()
    history = history or History(None, status.router, TokenLatencies())

    async def dashboard(request: web.Request) -> web.Response:
        page = render_page(await status.document(), history.to_json(), await read_timeline(status.store, history))
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def api_status(request: web.Request) -> web.Response:
        return web.json_response(await status.document(), headers={"Cache-Control": "no-store"})

    async def api_history(request: web.Request) -> web.Response:
        since = _number(request, "since", None)
        return web.json_response(history.to_json(since), headers={"Cache-Control": "no-store"})

    async def api_timeline(request: web.Request) -> web.Response:
        window_s = min(MAX_TIMELINE_S, max(0.05, _number(request, "window_s", TIMELINE_S)))
        doc = await read_timeline(status.store, history, window_s)
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def prometheus(request: web.Request) -> web.Response:
        body = await metrics.render(status.store, status.router)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        if not status.ready:
            return web.Response(status=503, text="starting or draining\n")
        if not status.router.can_serve:
            return web.Response(status=503, text=f"{status.router.why_unavailable()}\n")
        if (alert := status.alert()) is not None:
            return web.Response(text=f"degraded: {alert}\n")
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/", dashboard)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/api/history", api_history)
    app.router.add_get("/api/timeline", api_timeline)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/healthz", healthz)
    return app


async def start_http(
    status: StatusReporter, host: str, port: int, metrics: GatewayMetrics | None = None,
    history: History | None = None,
) -> web.AppRunner:
    """Serve the app on ``host:port``; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(build_app(status, metrics, history), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def _number(request: web.Request, name: str, default):
    """The query parameter ``name`` as a float; 400 naming it when it is not a number."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}={text!r} is not a number\n") from None
    if not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"{name}={text!r} must be a finite number\n")
    return value
