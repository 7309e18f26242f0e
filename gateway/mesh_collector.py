"""A prometheus-client ``Collector`` over the mesh as Redis and the gateway's chains hold it.

The gateway reads Redis (asynchronously) just before each scrape and hands the result to the
collector as a ``Snapshot``; ``collect`` only turns it into metric families. Series::

    per stage worker, labels {chain, stage}:
      stagemesh_stage_up                                1 while it heartbeats, 0 once it stopped
      stagemesh_stage_last_heartbeat_timestamp_seconds  Unix time of its last heartbeat figures
      stagemesh_stage_kv_blocks_used / _kv_blocks_total KV-cache blocks
      stagemesh_stage_queue_depth                       steps received and not yet answered
      stagemesh_stage_running_sequences                 sequences whose KV cache it holds
      stagemesh_stage_busy_fraction                     share of its last heartbeat window spent in steps
      stagemesh_stage_bubble_fraction                   see gateway.stage_stats
      stagemesh_stage_steps_total, _steps_failed_total, _tokens_total
      stagemesh_stage_bytes_sent_total                  activations sent to the next stage
      stagemesh_stage_step_latency_seconds              histogram, buckets counted by the stage
    labels {chain, stage, tp_rank}:
      stagemesh_stage_weight_bytes                      weights held by each tensor-parallel rank
    per expert worker, labels {chain, expert_worker}:
      stagemesh_expert_worker_up, _queue_depth, _busy_fraction, _weight_bytes
      stagemesh_expert_worker_batches_total, _tokens_total
    labels {chain, expert_worker, layer, expert}:
      stagemesh_expert_tokens_total                     token rows run by each expert (figure ``expert_tokens``,
                                                        {"<layer>:<expert>": rows})
    per chain, labels {chain}:
      stagemesh_chain_healthy, _requests_running, _requests_waiting, _kv_blocks_reserved, _kv_blocks_total

A figure a worker does not publish gives no sample (never a made-up 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.router import ChainHandle
from gateway.stage_stats import bubble_fractions
from stagemesh.mesh.store import WorkerInfo

STAGE = ("chain", "stage")
EXPERT = ("chain", "expert_worker")

_STAGE_GAUGES = (
    ("kv_blocks_used", "KV-cache blocks holding sequences."),
    ("kv_blocks_total", "KV-cache blocks allocated."),
    ("queue_depth", "Steps received and not yet answered."),
    ("running_sequences", "Sequences whose KV cache the stage holds."),
    ("busy_fraction", "Share of the last heartbeat window spent running steps."),
)
_STAGE_COUNTERS = (  # (series, figure)
    ("steps", "steps"),
    ("steps_failed", "steps_failed"),
    ("tokens", "tokens_processed"),
    ("bytes_sent", "bytes_sent"),
)
_EXPERT_GAUGES = (
    ("queue_depth", "Expert batches received and not yet answered."),
    ("busy_fraction", "Share of the last heartbeat window spent running experts."),
    ("weight_bytes", "Weight bytes of the experts it holds."),
)
_EXPERT_COUNTERS = (  # (series, figure)
    ("batches", "batches"),
    ("tokens", "tokens_processed"),
)


@dataclass
class Snapshot:
    """What one scrape reports: the registry, the figures and the gateway's chains."""

    chains: list[ChainHandle] = field(default_factory=list)
    workers: list[WorkerInfo] = field(default_factory=list)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """worker id -> its latest heartbeat figures (``Store.get_metrics``)."""
    error: str | None = None
    """Why Redis could not be read (then only the chains are reported)."""


class MeshCollector(Collector):
    """Metric families of the latest ``snapshot`` (set by ``GatewayMetrics.render``)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield GaugeMetricFamily("stagemesh_redis_up", "1 when the gateway could read Redis at this scrape.",
                                value=0 if snap.error else 1)
        yield from _chain_families(snap.chains)
        stages = [w for w in snap.workers if w.role == "stage"]
        yield from _stage_families(stages, snap.figures, time.time())
        yield from _expert_families([w for w in snap.workers if w.role == "expert"], snap.figures)


def _chain_families(chains: list[ChainHandle]) -> Iterator[Metric]:
    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"stagemesh_chain_{name}", doc, labels=["chain"])

    healthy = gauge("healthy", "1 while the chain is in service: every worker of it heartbeats and answers.")
    running = gauge("requests_running", "Requests admitted and generating.")
    waiting = gauge("requests_waiting", "Requests queued, not yet admitted.")
    reserved = gauge("kv_blocks_reserved", "KV blocks the scheduler reserved.")
    total = gauge("kv_blocks_total", "KV blocks the scheduler may reserve.")
    for handle in chains:
        chain, scheduler = [str(handle.chain_id)], handle.engine.scheduler
        healthy.add_metric(chain, 1 if handle.healthy else 0)
        running.add_metric(chain, scheduler.num_running)
        waiting.add_metric(chain, scheduler.num_waiting)
        reserved.add_metric(chain, scheduler.kv_blocks_used)
        total.add_metric(chain, scheduler.config.num_blocks)
    yield from (healthy, running, waiting, reserved, total)


def _stage_families(stages: list[WorkerInfo], figures: dict[str, dict], now: float) -> Iterator[Metric]:
    up = GaugeMetricFamily("stagemesh_stage_up", "1 while the stage worker heartbeats.", labels=STAGE)
    beat = GaugeMetricFamily("stagemesh_stage_last_heartbeat_timestamp_seconds",
                             "Unix time of the stage's last heartbeat figures.", labels=STAGE)
    gauges = {name: GaugeMetricFamily(f"stagemesh_stage_{name}", doc, labels=STAGE) for name, doc in _STAGE_GAUGES}
    counters = {name: CounterMetricFamily(f"stagemesh_stage_{name}", f"Stage figure {figure} since it started.",
                                          labels=STAGE) for name, figure in _STAGE_COUNTERS}
    bubble = GaugeMetricFamily("stagemesh_stage_bubble_fraction",
                               "Share of the recent time the chain worked while this stage was idle.", labels=STAGE)
    latency = HistogramMetricFamily("stagemesh_stage_step_latency_seconds", "Duration of the stage's steps.",
                                    labels=STAGE)
    weights = GaugeMetricFamily("stagemesh_stage_weight_bytes", "Weight bytes held by each tensor-parallel rank.",
                                labels=(*STAGE, "tp_rank"))
    for info in stages:
        labels, figs = [_label(info.chain), _label(info.stage)], figures.get(info.worker_id, {})
        up.add_metric(labels, 1 if info.alive else 0)
        _add_number(beat, labels, figs.get("time"))
        for name, _ in _STAGE_GAUGES:
            _add_number(gauges[name], labels, figs.get(name))
        for name, figure in _STAGE_COUNTERS:
            _add_number(counters[name], labels, figs.get(figure))
        _add_histogram(latency, labels, figs.get("step_latency"))
        for rank, size in enumerate(figs.get("rank_weight_bytes") or ()):
            _add_number(weights, [*labels, str(rank)], size)
    for chain, infos in _by_chain(stages).items():
        intervals = {info.stage: figures[info.worker_id].get("busy_intervals") or []
                     for info in infos if info.worker_id in figures}  # gone stages have no bubble
        for stage, value in bubble_fractions(intervals, now).items():
            bubble.add_metric([chain, _label(stage)], value)
    yield from (up, beat, *gauges.values(), bubble, *counters.values(), latency, weights)


def _expert_families(experts: list[WorkerInfo], figures: dict[str, dict]) -> Iterator[Metric]:
    up = GaugeMetricFamily("stagemesh_expert_worker_up", "1 while the expert worker heartbeats.", labels=EXPERT)
    gauges = {name: GaugeMetricFamily(f"stagemesh_expert_worker_{name}", doc, labels=EXPERT)
              for name, doc in _EXPERT_GAUGES}
    counters = {name: CounterMetricFamily(f"stagemesh_expert_worker_{name}",
                                          f"Expert worker figure {figure} since it started.", labels=EXPERT)
                for name, figure in _EXPERT_COUNTERS}
    per_expert = CounterMetricFamily("stagemesh_expert_tokens", "Token rows run by each expert.",
                                     labels=(*EXPERT, "layer", "expert"))
    for info in experts:
        labels, figs = [_label(info.chain), info.worker_id], figures.get(info.worker_id, {})
        up.add_metric(labels, 1 if info.alive else 0)
        for name, _ in _EXPERT_GAUGES:
            _add_number(gauges[name], labels, figs.get(name))
        for name, figure in _EXPERT_COUNTERS:
            _add_number(counters[name], labels, figs.get(figure))
        load = figs.get("expert_tokens")
        for key, count in (load.items() if isinstance(load, dict) else ()):
            layer, _, expert = str(key).rpartition(":")
            _add_number(per_expert, [*labels, layer, expert], count)
    yield from (up, *gauges.values(), *counters.values(), per_expert)


def _by_chain(stages: list[WorkerInfo]) -> dict[str, list[WorkerInfo]]:
    chains: dict[str, list[WorkerInfo]] = {}
    for info in stages:
        chains.setdefault(_label(info.chain), []).append(info)
    return chains


def _label(value: int | None) -> str:
    return "" if value is None else str(value)


def _add_number(family: Metric, labels: list[str], value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        family.add_metric(labels, value)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], figure: Any) -> None:
    """From the stage's ``step_latency`` figure (``stagemesh.runtime.histogram``): per-bucket counts
    become Prometheus' cumulative ``le`` buckets."""
    if not isinstance(figure, dict) or len(figure.get("counts", ())) != len(figure.get("bounds", ())) + 1:
        return
    bounds = [*map(float, figure["bounds"]), float("inf")]
    buckets, total = [], 0
    for bound, count in zip(bounds, figure["counts"]):
        total += count
        buckets.append((_le(bound), total))
    family.add_metric(labels, buckets, sum_value=float(figure.get("sum", 0.0)))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
