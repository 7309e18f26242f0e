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

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.history import RecentLatencies
from gateway.mesh_collector import MeshCollector, Snapshot
from gateway.router import Router
from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
NO_CHAIN = "none"


class GatewayMetrics:
    """The registry and the request-side series; ``render`` adds the mesh's figures at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stagemesh_requests", "Generate calls ended, by chain and outcome.", ("chain", "outcome"),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "stagemesh_time_to_first_token_seconds", "From the gateway receiving a request to its first token.",
            ("chain",), buckets=TTFT_BUCKETS_S, registry=self.registry,
        )
        self.itl = Histogram(
            "stagemesh_inter_token_latency_seconds", "Between two consecutive tokens of one request.",
            ("chain",), buckets=ITL_BUCKETS_S, registry=self.registry,
        )
        self.mesh = MeshCollector()
        self.registry.register(self.mesh)
        self.recent = RecentLatencies()
        """The same TTFT / ITL values, kept raw until the dashboard's history samples them (``gateway.history``)."""

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
        self._start = self._last = time.monotonic()
        self._tokens = 0
        self._ttft = self._itl = None
        """The chain's histogram children, looked up once per chain, not once per token."""

    def admitted(self, chain_id: int) -> None:
        self.chain = str(chain_id)
        self._ttft = self._itl = None

    def token(self) -> None:
        now = time.monotonic()
        if self._itl is None:
            self._ttft, self._itl = self._metrics.ttft.labels(self.chain), self._metrics.itl.labels(self.chain)
        if self._tokens == 0:
            self._ttft.observe(now - self._start)
            self._metrics.recent.add(self.chain, "ttft", now - self._start)
        else:
            self._itl.observe(now - self._last)
            self._metrics.recent.add(self.chain, "itl", now - self._last)
        self._tokens += 1
        self._last = now

    def done(self) -> None:
        self._metrics.requests.labels(self.chain, self.outcome).inc()
