"""A prometheus-client ``Collector`` over the mesh as Redis and the gateway's chains hold it.

The gateway reads Redis (asynchronously) just before each scrape and hands the result to the
collector as a ``Snapshot``; ``collect`` only turns it into metric families. Series::

    per stage worker, labels {chain, stage}:
      stagemesh_stage_up                                1 while it heartbeats, 0 once it stopped
      stagemesh_stage_last_heartbeat_timestamp_seconds  Unix time of its last heartbeat figures
      stagemesh_stage_kv_blocks_used / _kv_blocks_capacity KV-cache blocks
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
      stagemesh_chain_healthy, _requests_running, _requests_waiting, _kv_blocks_reserved, _kv_blocks_capacity
    the gateway's own reads of Redis (``stagemesh.mesh.signing``):
      stagemesh_documents_signed                        1 when it checks the documents' signatures (a mesh key)
      stagemesh_refused_documents_total{kind}           forged documents it refused (each counted once), by
                                                        kind: topology, placement, worker, journal

Each figure's series name and help text are declared with the figure (``stagemesh.mesh.figures``).
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
from stagemesh.mesh.figures import COUNTER, GAUGE, ExpertFigures, StageFigures, WorkerFigures
from stagemesh.mesh.signing import KINDS
from stagemesh.mesh.store import WorkerInfo

STAGE = ("chain", "stage")
EXPERT = ("chain", "expert_worker")

@dataclass
class Snapshot:
    """What one scrape reports: the registry, the figures and the gateway's chains."""

    chains: list[ChainHandle] = field(default_factory=list)
    workers: list[WorkerInfo] = field(default_factory=list)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """worker id -> its latest heartbeat figures (``Store.get_metrics``)."""
    error: str | None = None
    """Why Redis could not be read (then only the chains are reported)."""
    signed: bool | None = None
    """Whether the gateway's store checks signatures; None without a store."""
    refused: dict[str, int] = field(default_factory=dict)
    """kind -> documents the gateway's store refused so far (``Store.refusals``)."""


class MeshCollector(Collector):
    """Metric families of the latest ``snapshot`` (set by ``GatewayMetrics.render``)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield GaugeMetricFamily("stagemesh_redis_up", "1 when the gateway could read Redis at this scrape.",
                                value=0 if snap.error else 1)
        yield from _chain_families(snap.chains)
        yield from _refusal_families(snap)
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
    total = gauge("kv_blocks_capacity", "KV blocks the scheduler may reserve.")
    for handle in chains:
        chain, scheduler = [str(handle.chain_id)], handle.engine.scheduler
        healthy.add_metric(chain, 1 if handle.healthy else 0)
        running.add_metric(chain, scheduler.num_running)
        waiting.add_metric(chain, scheduler.num_waiting)
        reserved.add_metric(chain, scheduler.kv_blocks_used)
        total.add_metric(chain, scheduler.config.num_blocks)
    yield from (healthy, running, waiting, reserved, total)


def _refusal_families(snap: Snapshot) -> Iterator[Metric]:
    if snap.signed is None:
        return
    yield GaugeMetricFamily("stagemesh_documents_signed", "1 when the gateway checks the signatures of the "
                            "documents it reads from Redis (it has the mesh key); 0 under --insecure.",
                            value=int(snap.signed))
    refused = CounterMetricFamily("stagemesh_refused_documents", "Documents in Redis the gateway refused because "
                                  "their signature was missing or wrong (forged), each counted once, by kind.",
                                  labels=("kind",))
    for kind in KINDS:
        refused.add_metric([kind], snap.refused.get(kind, 0))
    yield refused


def _stage_families(stages: list[WorkerInfo], figures: dict[str, dict], now: float) -> Iterator[Metric]:
    up = GaugeMetricFamily("stagemesh_stage_up", "1 while the stage worker heartbeats.", labels=STAGE)
    plain = _plain_families(StageFigures, STAGE)
    bubble = GaugeMetricFamily("stagemesh_stage_bubble_fraction",
                               "Share of the recent time the chain worked while this stage was idle.", labels=STAGE)
    latency = HistogramMetricFamily(*StageFigures.series("step_latency"), labels=STAGE)
    weights = GaugeMetricFamily(*StageFigures.series("rank_weight_bytes"), labels=(*STAGE, "tp_rank"))
    for info in stages:
        labels, figs = [_label(info.chain), _label(info.stage)], StageFigures.from_json(figures.get(info.worker_id, {}))
        up.add_metric(labels, 1 if info.alive else 0)
        _add_plain(plain, labels, figs)
        _add_histogram(latency, labels, figs.step_latency)
        for rank, size in enumerate(figs.rank_weight_bytes or ()):
            _add_number(weights, [*labels, str(rank)], size)
    for chain, infos in _by_chain(stages).items():
        intervals = {info.stage: StageFigures.from_json(figures[info.worker_id]).intervals
                     for info in infos if info.worker_id in figures}  # gone stages have no bubble
        for stage, value in bubble_fractions(intervals, now).items():
            bubble.add_metric([chain, _label(stage)], value)
    yield from (up, *plain.values(), bubble, latency, weights)


def _expert_families(experts: list[WorkerInfo], figures: dict[str, dict]) -> Iterator[Metric]:
    up = GaugeMetricFamily("stagemesh_expert_worker_up", "1 while the expert worker heartbeats.", labels=EXPERT)
    plain = _plain_families(ExpertFigures, EXPERT)
    per_expert = CounterMetricFamily(*ExpertFigures.series("expert_tokens"), labels=(*EXPERT, "layer", "expert"))
    for info in experts:
        labels, figs = [_label(info.chain), info.worker_id], ExpertFigures.from_json(figures.get(info.worker_id, {}))
        up.add_metric(labels, 1 if info.alive else 0)
        _add_plain(plain, labels, figs)
        load = figs.expert_tokens
        for key, count in (load.items() if isinstance(load, dict) else ()):
            layer, _, expert = str(key).rpartition(":")
            _add_number(per_expert, [*labels, layer, expert], count)
    yield from (up, *plain.values(), per_expert)


def _plain_families(figures: type[WorkerFigures], labels: tuple[str, ...]) -> dict[str, Metric]:
    """figure name -> its one-sample-per-worker family, for each gauge and counter figure of the role."""
    families: dict[str, Metric] = {}
    for kind, family in ((GAUGE, GaugeMetricFamily), (COUNTER, CounterMetricFamily)):
        families.update({name: family(*figures.series(name), labels=labels) for name in figures.exported(kind)})
    return families


def _add_plain(families: dict[str, Metric], labels: list[str], figures: WorkerFigures) -> None:
    for name, family in families.items():
        _add_number(family, labels, getattr(figures, name))


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
