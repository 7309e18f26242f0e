"""The dashboard's history: per chain and per stage, the last ten minutes of the mesh's load, one
sample every two seconds in a ring buffer, served as JSON on ``GET /api/history``.

Every chart is declared once (``CHAIN_CHARTS``, ``STAGE_CHARTS``: title, unit, the series it
draws); the page draws the charts the document declares, so a series added here shows up there.
What each series is, per sample:

    chain  tokens_per_s        tokens its engine emitted since the previous sample, per second
           ttft_p50_s, _p99_s  time to first token of the requests that got it since the previous
           itl_p50_s, _p99_s   sample, and the gaps between their tokens (``gateway.latencies``, fed
                               by ``gateway.metrics``); null when no request got a token
           requests_waiting, requests_running   the scheduler's queue now
           kv_fraction         KV blocks its scheduler reserved / its blocks
           busy_fraction, bubble_fraction       the mean over its stages
    stage  tokens_per_s, queue_depth, busy_fraction   the stage's figures of its last heartbeat
           kv_fraction         ``kv_blocks_used / kv_blocks_total`` of those figures
           step_p50_s, _p99_s  durations of its steps that ended since the previous sample; null
                               when none did

A stage whose figures expired (it stopped beating) gets no sample: its charts show a gap.

NOTE: the expert load has no chart: the sampler keeps what each expert ran over the last
``EXPERT_SAMPLES`` samples (``expert_recent``) for the timeline's heat rows (``gateway.timeline``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.latencies import TokenLatencies
from gateway.router import ChainHandle, Router
from gateway.stage_stats import bubble_fractions, percentile
from stagemesh.errors import StagemeshError
from stagemesh.mesh.figures import ExpertFigures, StageFigures
from stagemesh.mesh.store import Store, WorkerInfo

log = logging.getLogger(__name__)

SAMPLE_S = 2.0
WINDOW_S = 600.0
EXPERT_SAMPLES = 5
"""The heat rows show the tokens each expert ran over the last 5 samples (10 s)."""


@dataclass(frozen=True)
class Chart:
    """One small chart of the dashboard: the series it draws share its axis."""

    key: str
    title: str
    unit: str
    """"tok/s", "s", "" (a count) or "%" (a fraction 0..1, drawn on a fixed 0..100 % axis)."""
    lines: tuple[str, ...]
    """The series it draws, the first one solid, a second one (a p99, say) lighter."""


CHAIN_CHARTS = (
    Chart("tokens", "tokens/s", "tok/s", ("tokens_per_s",)),
    Chart("ttft", "TTFT p50 / p99", "s", ("ttft_p50_s", "ttft_p99_s")),
    Chart("itl", "ITL p50 / p99", "s", ("itl_p50_s", "itl_p99_s")),
    Chart("queue", "running / waiting", "", ("requests_running", "requests_waiting")),
    Chart("kv", "KV reserved", "%", ("kv_fraction",)),
    Chart("busy", "busy / bubble", "%", ("busy_fraction", "bubble_fraction")),
)
STAGE_CHARTS = (
    Chart("tokens", "tokens/s", "tok/s", ("tokens_per_s",)),
    Chart("step", "step p50 / p99", "s", ("step_p50_s", "step_p99_s")),
    Chart("queue", "queue", "", ("queue_depth",)),
    Chart("kv", "KV used", "%", ("kv_fraction",)),
    Chart("busy", "busy", "%", ("busy_fraction",)),
)


@dataclass
class Series:
    """The samples of one chain or one stage: times and one value per line of its charts."""

    lines: tuple[str, ...]
    size: int
    meta: dict[str, Any] = field(default_factory=dict)
    t: deque[float] = field(init=False)
    values: dict[str, deque] = field(init=False)

    def __post_init__(self) -> None:
        self.t = deque(maxlen=self.size)
        self.values = {line: deque(maxlen=self.size) for line in self.lines}

    def add(self, now: float, values: dict[str, float | None]) -> None:
        self.t.append(now)
        for line in self.lines:
            value = values.get(line)
            self.values[line].append(None if value is None else round(float(value), 6))

    def to_json(self, since: float | None) -> dict[str, Any]:
        first = 0 if since is None else next((i for i, t in enumerate(self.t) if t > since), len(self.t))
        return {**self.meta, "t": list(self.t)[first:],
                "values": {line: list(v)[first:] for line, v in self.values.items()}}


class History:
    """The ring buffer and its sampler (``run``); ``to_json`` is the ``/api/history`` document."""

    def __init__(self, store: Store | None, router: Router, latencies: TokenLatencies,
                 sample_s: float = SAMPLE_S, window_s: float = WINDOW_S):
        self.store, self.router, self.latencies = store, router, latencies
        self.sample_s, self.window_s = sample_s, window_s
        self._size = max(2, round(window_s / sample_s))
        self._chains: dict[int, Series] = {}
        self._stages: dict[str, Series] = {}
        self._last: float | None = None
        self._emitted: dict[int, tuple[int, int]] = {}
        """chain id -> (id of its engine, tokens it had emitted) at the previous sample."""
        self._expert_totals: dict[tuple[int, str], int] = {}
        self._expert_deltas: dict[int, deque[dict[str, int]]] = {}
        self.expert_recent: dict[int, dict[str, int]] = {}
        """chain (-1: shared expert workers) -> ``"<layer>:<expert>"`` -> rows over the last samples."""

    async def run(self) -> None:
        """Sample every ``sample_s`` until cancelled; a sample that fails is logged and skipped."""
        while True:
            try:
                await self.sample()
            except Exception:  # noqa: BLE001 - the dashboard's history must not stop the gateway's
                log.exception("dashboard history: a sample failed")
            await asyncio.sleep(self.sample_s)

    async def sample(self, now: float | None = None) -> None:
        """One sample of every chain (and of every stage whose figures Redis holds)."""
        workers: list[WorkerInfo] = []
        metrics: dict[str, dict[str, Any]] = {}
        if self.store is not None:
            try:
                workers, metrics = await asyncio.gather(self.store.list_workers(), self.store.get_metrics())
            except StagemeshError as err:
                log.debug("history sample without the workers' figures: %s", err)
        self.record(time.time() if now is None else now, workers, metrics)

    def record(self, now: float, workers: list[WorkerInfo], metrics: dict[str, dict[str, Any]]) -> None:
        """Add the sample taken at ``now`` from the chains' engines and the workers' figures."""
        now = round(now, 3)  # as stored: the ``now`` of ``to_json`` is the time of its last sample, exactly
        since = self._last if self._last is not None else now - self.sample_s
        stages = {w.worker_id: (w, StageFigures.from_json(metrics.get(w.worker_id, {})))
                  for w in workers if w.role == "stage" and w.chain is not None and w.stage is not None}
        live = {wid: pair for wid, pair in stages.items() if pair[1].time is not None}
        for handle in self.router.chains:
            mine = {wid: figs for wid, (info, figs) in live.items() if info.chain == handle.chain_id}
            series = self._series(self._chains, handle.chain_id, CHAIN_CHARTS, {"chain": handle.chain_id})
            series.add(now, self._chain_values(handle, mine, now, max(now - since, 1e-6)))
        for info, figs in live.values():
            name = f"c{info.chain}-s{info.stage}"
            series = self._series(self._stages, name, STAGE_CHARTS,
                                  {"name": name, "chain": info.chain, "stage": info.stage})
            series.add(now, stage_values(figs, since))
        self._record_experts([w for w in workers if w.role == "expert"], metrics)
        self._last = now

    def _series(self, table: dict, key, charts: tuple[Chart, ...], meta: dict[str, Any]) -> Series:
        if key not in table:
            table[key] = Series(tuple(line for chart in charts for line in chart.lines), self._size, meta)
        return table[key]

    def _chain_values(self, handle: ChainHandle, stages: dict[str, StageFigures], now: float,
                      dt: float) -> dict[str, float | None]:
        scheduler, label = handle.engine.scheduler, str(handle.chain_id)
        ttft, itl = self.latencies.take(label, "ttft"), self.latencies.take(label, "itl")
        bubbles = bubble_fractions({wid: f.intervals for wid, f in stages.items()}, now) if stages else {}
        busy = [f.busy_fraction or 0.0 for f in stages.values()]
        return {
            "tokens_per_s": self._emitted_since(handle) / dt,
            "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
            "ttft_p99_s": percentile(ttft, 0.99) if ttft else None,
            "itl_p50_s": percentile(itl, 0.5) if itl else None,
            "itl_p99_s": percentile(itl, 0.99) if itl else None,
            "requests_running": scheduler.num_running,
            "requests_waiting": scheduler.num_waiting,
            "kv_fraction": scheduler.kv_blocks_used / max(1, scheduler.config.num_blocks),
            "busy_fraction": sum(busy) / len(busy) if busy else 0.0,
            "bubble_fraction": sum(bubbles.values()) / len(bubbles) if bubbles else 0.0,
        }

    def _emitted_since(self, handle: ChainHandle) -> int:
        """Tokens emitted since the previous sample (a chain back from an outage has a new engine)."""
        engine, emitted = id(handle.engine), handle.engine.counters.tokens_emitted
        before_engine, before = self._emitted.get(handle.chain_id, (engine, emitted))
        self._emitted[handle.chain_id] = (engine, emitted)
        return emitted - before if engine == before_engine else emitted

    def _record_experts(self, experts: list[WorkerInfo], metrics: dict[str, dict[str, Any]]) -> None:
        """Each chain's expert rows since the previous sample, summed over its last ``EXPERT_SAMPLES``."""
        now: dict[int, dict[str, int]] = {}
        for info in experts:
            tokens = ExpertFigures.from_json(metrics.get(info.worker_id, {})).expert_tokens
            chain = now.setdefault(-1 if info.chain is None else info.chain, {})
            for key, rows in (tokens or {}).items():
                if isinstance(rows, (int, float)):
                    chain[key] = chain.get(key, 0) + int(rows)
        for chain, totals in now.items():
            delta = {key: max(0, rows - self._expert_totals.get((chain, key), rows)) for key, rows in totals.items()}
            self._expert_totals.update({(chain, key): rows for key, rows in totals.items()})
            deltas = self._expert_deltas.setdefault(chain, deque(maxlen=EXPERT_SAMPLES))
            deltas.append(delta)
            self.expert_recent[chain] = {key: sum(d.get(key, 0) for d in deltas) for key in totals}

    def to_json(self, since: float | None = None) -> dict[str, Any]:
        """The ``/api/history`` document; with ``since`` (a sample time), only the samples after it."""
        return {
            "sample_s": self.sample_s,
            "window_s": self.window_s,
            "now": self._last,
            "charts": {"chain": [asdict(c) for c in CHAIN_CHARTS], "stage": [asdict(c) for c in STAGE_CHARTS]},
            "chains": [s.to_json(since) for _, s in sorted(self._chains.items())],
            "stages": [s.to_json(since) for _, s in sorted(self._stages.items(),
                                                          key=lambda kv: (kv[1].meta["chain"], kv[1].meta["stage"]))],
        }


def stage_values(figures: StageFigures, since: float) -> dict[str, float | None]:
    """One stage's sample from its last heartbeat figures; the step quantiles over the steps that
    ended after ``since``."""
    durations = [t1 - t0 for t0, t1 in (pair for pair in figures.intervals if len(pair) == 2) if t1 > since]
    total = figures.kv_blocks_total or 0
    return {
        "tokens_per_s": figures.tokens_per_s or 0.0,
        "step_p50_s": percentile(durations, 0.5) if durations else None,
        "step_p99_s": percentile(durations, 0.99) if durations else None,
        "queue_depth": figures.queue_depth or 0,
        "kv_fraction": (figures.kv_blocks_used or 0) / total if total else 0.0,
        "busy_fraction": figures.busy_fraction or 0.0,
    }
