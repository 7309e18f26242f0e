"""The dashboard's derived figures and the Prometheus exposition, on hand-written figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.mesh_collector import Snapshot
from gateway.metrics import GatewayMetrics
from gateway.stage_stats import bubble_fractions, percentile, step_latency_quantiles
from gateway.status import worker_status
from stagemesh.mesh.figures import StageFigures
from stagemesh.mesh.store import WorkerInfo
from stagemesh.runtime.histogram import LatencyHistogram
from stagemesh.wire.codec.messages import status_from_pb, status_to_pb


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0 and percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0 and percentile([], 0.5) == 0.0
    # durations 0.1, 0.2, 0.3: p50 is the 2nd, p99 the 3rd
    assert step_latency_quantiles([[1.0, 1.1], [2.0, 2.3], [3.0, 3.2]]) == pytest.approx((0.2, 0.3))


def test_bubble_of_a_chain_from_its_stages_intervals():
    # Window [0, 10] (now=10). The chain works over [0, 4] (the union of both stages' steps).
    # Stage 0 is busy [0, 2] -> 2 of 4 s: bubble 0.5. Stage 1 is busy [1, 3] + [3, 4] -> 3 of 4 s: 0.25.
    intervals = {0: [[0.0, 2.0]], 1: [[1.0, 3.0], [3.0, 4.0]]}
    assert bubble_fractions(intervals, now=10.0, window_s=10.0) == pytest.approx({0: 0.5, 1: 0.25})
    # Steps older than the window are not counted; an idle chain has no bubble.
    assert bubble_fractions(intervals, now=100.0, window_s=10.0) == {0: 0.0, 1: 0.0}
    # Perfect overlap: no bubble.
    assert bubble_fractions({0: [[0, 5]], 1: [[0, 5]]}, now=5.0, window_s=10.0) == {0: 0.0, 1: 0.0}


def test_latency_histogram_buckets_are_le_inclusive():
    hist = LatencyHistogram(bounds=(0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 2.0):
        hist.observe(seconds)
    assert hist.figure() == {"bounds": [0.01, 0.1], "counts": [2, 1, 1], "sum": pytest.approx(2.065)}


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _snapshot() -> Snapshot:
    stage = WorkerInfo("stage-c0-s1", "stage", chain=0, stage=1, start_layer=3, end_layer=5, address="a:1", tp_size=2)
    dead = WorkerInfo("stage-c0-s0", "stage", chain=0, stage=0, start_layer=0, end_layer=3, address="a:0", alive=False)
    expert = WorkerInfo("expert-c0-e0", "expert", chain=0, experts={1: [0, 1]}, address="a:2")
    hist = LatencyHistogram(bounds=(0.01, 0.1))
    hist.observe(0.02)
    figures = {
        "stage-c0-s1": {"time": 1.5, "kv_blocks_used": 3, "kv_blocks_total": 64, "queue_depth": 1, "busy_fraction": 0.5,
                        "steps": 10, "tokens_processed": 40, "bytes_sent": 0, "step_latency": hist.figure(),
                        "rank_weight_bytes": [100, 90], "busy_intervals": [[1.0, 1.02]]},
        "expert-c0-e0": {"queue_depth": 0, "tokens_processed": 7, "expert_tokens": {"1:0": 5, "1:1": 2}},
    }
    return Snapshot(workers=[dead, stage, expert], figures=figures)


def test_exposition_parses_and_carries_stage_and_expert_series():
    metrics = GatewayMetrics()
    tracker = metrics.track()
    tracker.admitted(0)
    tracker.token()
    tracker.token()
    tracker.outcome = "ok"
    tracker.done()
    metrics.mesh.snapshot = _snapshot()
    fams = _families(generate_latest(metrics.registry).decode())
    values = {(s.name, frozenset(s.labels.items())): s.value for f in fams.values() for s in f.samples}

    def value(name, **labels):
        return values.get((name, frozenset(labels.items())))

    s1 = {"chain": "0", "stage": "1"}
    assert value("stagemesh_requests_total", chain="0", outcome="ok") == 1
    assert value("stagemesh_time_to_first_token_seconds_count", chain="0") == 1
    assert value("stagemesh_inter_token_latency_seconds_count", chain="0") == 1
    assert value("stagemesh_stage_up", **s1) == 1 and value("stagemesh_stage_up", chain="0", stage="0") == 0
    assert value("stagemesh_stage_kv_blocks_used", **s1) == 3
    assert value("stagemesh_stage_kv_blocks_capacity", **s1) == 64
    assert value("stagemesh_stage_tokens_total", **s1) == 40
    assert value("stagemesh_stage_step_latency_seconds_bucket", **s1, le="0.01") == 0
    assert value("stagemesh_stage_step_latency_seconds_bucket", **s1, le="0.1") == 1
    assert value("stagemesh_stage_step_latency_seconds_count", **s1) == 1
    assert value("stagemesh_stage_weight_bytes", **s1, tp_rank="1") == 90
    assert value("stagemesh_expert_tokens_total", chain="0", expert_worker="expert-c0-e0", layer="1", expert="0") == 5
    assert value("stagemesh_expert_worker_tokens_total", chain="0", expert_worker="expert-c0-e0") == 7
    # a dead stage whose figures expired: up 0 and no made-up zeros
    assert value("stagemesh_stage_kv_blocks_used", chain="0", stage="0") is None


def test_grafana_dashboard_repeats_a_row_per_stage_over_series_the_gateway_exports():
    yaml = pytest.importorskip("yaml")
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    dashboard = json.loads((deploy / "grafana" / "stagemesh.json").read_text())
    assert "stage" in {v["name"] for v in dashboard["templating"]["list"]}
    assert any(p["type"] == "row" and p.get("repeat") == "stage" for p in dashboard["panels"])
    metrics = GatewayMetrics()
    tracker = metrics.track()
    tracker.token()
    tracker.token()
    tracker.done()
    metrics.mesh.snapshot = _snapshot()
    families = list(text_string_to_metric_families(generate_latest(metrics.registry).decode()))
    exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    used = {name for expr in exprs for name in re.findall(r"stagemesh_\w+", expr)}
    assert used and used <= exported, sorted(used - exported)
    scrape = yaml.safe_load((deploy / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"]


def test_a_worker_s_status_load_comes_from_its_figures_and_travels_on_the_wire():
    stage = WorkerInfo("stage-c0-s1", "stage", chain=0, stage=1, start_layer=3, end_layer=5, address="a:1")
    figures = StageFigures(time=10.0, queue_depth=2, kv_blocks_total=64, busy_intervals=[[9.0, 9.1], [9.5, 9.8]])
    entry = worker_status(stage, figures, now=11.0, bubble=0.5)
    assert entry["heartbeat_age_s"] == 1.0
    load = entry["load"]
    assert (load["queue_depth"], load["kv_blocks_total"], load["kv_blocks_used"]) == (2, 64, 0)
    assert load["bubble_fraction"] == 0.5
    assert (load["step_latency_p50_s"], load["step_latency_p99_s"]) == pytest.approx((0.1, 0.3))
    assert status_from_pb(status_to_pb({"workers": [entry]}))["workers"][0]["load"] == pytest.approx(load)
