"""The gateway's Prometheus metrics, served as text on ``GET /metrics``.

Two sources, one ``CollectorRegistry`` of its own (never prometheus-client's global one, so
that two gateways in one process, as in tests, do not collide):

- what the gateway sees of each request, observed by the servicer as tokens stream out::

    stagemesh_requests_total{chain, outcome}                 counter; outcome "ok" or the gRPC
                                                             status in lower case ("cancelled", ...)
    stagemesh_time_to_first_token_seconds{chain}             histogram, request received -> first token
    stagemesh_inter_token_latency_seconds{chain}             histogram, between consecutive tokens

  ``chain`` is the chain the request was admitted to, "none" when it was refused before.
- the workers' latest heartbeat figures and the chains' scheduler state, read at scrape time
  (``gateway.mesh_collector``).
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, generate_latest

from gateway.latencies import FOLD_AT, TokenLatencies
from gateway.mesh_collector import MeshCollector, Snapshot
from gateway.router import Router
from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_CHAIN = "none"


class GatewayMetrics:
    """The registry and the request-side series; ``render`` adds the mesh's figures at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stagemesh_requests", "Generate calls ended, by chain and outcome.", ("chain", "outcome"),
            registry=self.registry,
        )
        self.latencies = TokenLatencies()
        """The TTFT and ITL histograms, and the same values for the dashboard's history (``gateway.history``)."""
        self.registry.register(self.latencies)
        self.mesh = MeshCollector()
        self.registry.register(self.mesh)

    def track(self) -> RequestTracker:
        """A tracker for one Generate call, started now."""
        return RequestTracker(self)

    async def render(self, store: Store | None, router: Router) -> bytes:
        """The exposition text: request series plus the mesh as Redis holds it right now."""
        snapshot = Snapshot(chains=list(router.chains))
        if store is not None:
            try:
                snapshot.workers, snapshot.figures = await asyncio.gather(store.list_workers(), store.get_metrics())
            except StagemeshError as err:
                snapshot.error = err.message
            snapshot.signed, snapshot.refused = store.signed, dict(store.refusals.counts)
        # NOTE: no await between setting the snapshot and reading it: concurrent scrapes on the
        # one event loop cannot interleave here.
        self.mesh.snapshot = snapshot
        return generate_latest(self.registry)


class RequestTracker:
    """Times one request's tokens and counts its outcome once, in ``done``."""

    def __init__(self, metrics: GatewayMetrics):
        self._metrics = metrics
        self.chain = NO_CHAIN
        """Set once the request is admitted to a chain."""
        self.outcome = "internal"
        """Set by the servicer: "ok", or the failure's gRPC status name in lower case."""
        self._last = time.monotonic()
        """When the request came in, then when its latest token streamed out: the first token's gap
        from it is its TTFT, every later one's an ITL."""
        self._tokens = 0
        self._ttft = self._itl = None
        """The chain's TTFT and ITL series (``gateway.latencies``), looked up once per chain, not once per token."""

    def admitted(self, chain_id: int) -> None:
        self.chain = str(chain_id)
        self._ttft = self._itl = None

    def token(self) -> None:
        """A token of this request streamed out now; runs per token, so it only appends a value."""
        now = time.monotonic()
        if self._itl is None:
            latencies = self._metrics.latencies
            self._ttft, self._itl = latencies.series(self.chain, "ttft"), latencies.series(self.chain, "itl")
        series = self._itl if self._tokens else self._ttft
        series.pending.append(now - self._last)
        if len(series.pending) >= FOLD_AT:
            series.fold()
        self._tokens += 1
        self._last = now

    def done(self) -> None:
        self._metrics.requests.labels(self.chain, self.outcome).inc()
