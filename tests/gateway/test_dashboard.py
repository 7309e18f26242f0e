"""The dashboard's documents on hand-written figures: the history ring buffer, the pipeline
timeline, and the page the gateway renders with the current values."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from gateway.dashboard import render_page
from gateway.history import CHAIN_CHARTS, STAGE_CHARTS, History
from gateway.latencies import TokenLatencies
from gateway.metrics import GatewayMetrics
from gateway.timeline import build_timeline
from stagemesh.mesh.store import WorkerInfo

STAGE0 = WorkerInfo("stage-c0-s0", "stage", chain=0, stage=0, start_layer=0, end_layer=2, address="h:1")
STAGE1 = WorkerInfo("stage-c0-s1", "stage", chain=0, stage=1, start_layer=2, end_layer=4, address="h:2")
EXPERT = WorkerInfo("expert-c0-e0", "expert", chain=0, experts={1: [0, 1, 2]}, address="h:3")


def _chain(chain_id: int = 0, emitted: int = 0):
    """What the history reads of a ChainHandle: its id, its engine's scheduler and counters."""
    scheduler = SimpleNamespace(num_running=2, num_waiting=1, kv_blocks_used=16, config=SimpleNamespace(num_blocks=64))
    engine = SimpleNamespace(scheduler=scheduler, counters=SimpleNamespace(tokens_emitted=emitted))
    return SimpleNamespace(chain_id=chain_id, engine=engine)


def _stage(t: float, intervals: list, steps: list | None = None, **more) -> dict:
    return {"time": t, "busy_intervals": intervals, "busy_steps": steps or list(range(len(intervals))),
            "kv_blocks_used": 8, "kv_blocks_total": 32, "queue_depth": 1, "busy_fraction": 0.5,
            "tokens_per_s": 40.0, **more}


def test_history_samples_each_chain_and_stage_into_a_ring_buffer():
    latencies = TokenLatencies()
    chain = _chain(emitted=100)
    history = History(None, SimpleNamespace(chains=[chain]), latencies, sample_s=2.0, window_s=6.0)  # 3 samples
    history.record(10.0, [STAGE0], {"stage-c0-s0": _stage(9.9, [[9.0, 9.1]])})
    # Between the samples at 10 and 12: 30 tokens, two TTFTs and four ITLs; stage 0 ran two steps
    # that ended after 10 (0.2 s and 0.4 s) and one before (not counted); stage 1 stopped beating.
    chain.engine.counters.tokens_emitted = 130
    for ttft in (0.5, 0.1):
        latencies.add("0", "ttft", ttft)
    for itl in (0.01, 0.02, 0.03, 0.04):
        latencies.add("0", "itl", itl)
    figures = {"stage-c0-s0": _stage(11.9, [[9.0, 9.1], [10.0, 10.2], [11.0, 11.4]]), "stage-c0-s1": {}}
    history.record(12.0, [STAGE0, STAGE1], figures)
    doc = history.to_json()

    assert [c["key"] for c in doc["charts"]["chain"]] == [c.key for c in CHAIN_CHARTS]
    assert [c["key"] for c in doc["charts"]["stage"]] == [c.key for c in STAGE_CHARTS]
    chain0 = doc["chains"][0]
    assert chain0["chain"] == 0 and chain0["t"] == [10.0, 12.0]
    values = chain0["values"]
    assert values["tokens_per_s"] == [0.0, 15.0]  # 30 tokens in 2 s
    assert values["ttft_p50_s"] == [None, 0.1] and values["ttft_p99_s"] == [None, 0.5]
    assert values["itl_p50_s"][1] == pytest.approx(0.02) and values["itl_p99_s"][1] == pytest.approx(0.04)
    assert values["kv_fraction"] == [0.25, 0.25] and values["requests_waiting"] == [1, 1]
    [stage] = doc["stages"]  # the stage without figures has no series at all
    assert stage["name"] == "c0-s0" and stage["t"] == [10.0, 12.0]
    assert stage["values"]["step_p50_s"][1] == pytest.approx(0.2)
    assert stage["values"]["step_p99_s"][1] == pytest.approx(0.4)
    assert stage["values"]["kv_fraction"] == [0.25, 0.25]

    for t in (14.0, 16.0):
        history.record(t, [STAGE0], {"stage-c0-s0": _stage(t - 0.1, [[9.0, 9.1]])})
    assert history.to_json()["chains"][0]["t"] == [12.0, 14.0, 16.0]  # a window of three samples
    later = history.to_json(since=14.0)
    assert later["chains"][0]["t"] == [16.0] and later["stages"][0]["values"]["step_p50_s"] == [None]


def test_the_gateway_s_request_tracker_feeds_the_history_s_latencies():
    metrics = GatewayMetrics()
    tracker = metrics.track()
    tracker.admitted(3)
    for _ in range(3):
        tracker.token()
    assert len(metrics.latencies.take("3", "ttft")) == 1 and len(metrics.latencies.take("3", "itl")) == 2
    assert metrics.latencies.take("3", "itl") == []  # taken once


def test_timeline_puts_every_stage_on_one_clock_ending_at_the_oldest_heartbeat():
    # Stage 0's figures are from t=20.0, stage 1's from 19.5: the window is [18.5, 19.5].
    # Micro-batch 7 runs on stage 0 over [19.0, 19.1], then on stage 1 over [19.1, 19.3];
    # stage 0's step 8 at [19.6, 19.7] lies past the window's end.
    figures = {
        "stage-c0-s0": _stage(20.0, [[10.0, 10.1], [19.0, 19.1], [19.6, 19.7]], [6, 7, 8]),
        "stage-c0-s1": _stage(19.5, [[19.1, 19.3]], [7]),
    }
    doc = build_timeline([STAGE1, STAGE0], figures, now=20.2, window_s=1.0)
    [chain] = doc["chains"]
    assert (chain["start"], chain["end"], chain["idle"]) == (18.5, 19.5, False)
    assert chain["age_s"] == pytest.approx(0.7)
    s0, s1 = chain["stages"]
    assert (s0["name"], s1["name"]) == ("c0-s0", "c0-s1")
    assert s0["steps"] == [[pytest.approx(0.5), pytest.approx(0.6), 7]]
    assert s1["steps"] == [[pytest.approx(0.6), pytest.approx(0.8), 7]]
    # over [18.5, 19.5] the chain worked [19.0, 19.3]: stage 0 idle 2/3 of it, stage 1 1/3
    assert (s0["bubble_fraction"], s1["bubble_fraction"]) == pytest.approx((2 / 3, 1 / 3), abs=1e-3)


def test_an_idle_chain_shows_its_last_steps_and_their_age():
    figures = {"stage-c0-s0": _stage(100.0, [[40.0, 40.2]]), "stage-c0-s1": _stage(100.0, [[40.2, 40.5]])}
    [chain] = build_timeline([STAGE0, STAGE1], figures, now=100.0, window_s=1.0)["chains"]
    assert chain["idle"] and chain["end"] == 40.5 and chain["age_s"] == pytest.approx(59.5)
    assert [len(s["steps"]) for s in chain["stages"]] == [1, 1]


def test_expert_heat_rows_show_the_recent_load_else_the_total():
    figures = {"expert-c0-e0": {"expert_tokens": {"1:0": 50, "1:2": 10}}}
    [row] = build_timeline([EXPERT], figures, now=1.0, expert_recent={0: {"1:0": 3, "1:2": 1}})["experts"]
    assert row == {"chain": 0, "layer": 1, "experts": [0, 1, 2], "tokens": [3, 0, 1], "window": "recent"}
    [row] = build_timeline([EXPERT], figures, now=1.0, expert_recent={0: {"1:0": 0}})["experts"]
    assert row["tokens"] == [50, 0, 10] and row["window"] == "total"


def test_history_keeps_each_expert_s_recent_rows():
    history = History(None, SimpleNamespace(chains=[]), TokenLatencies())
    for t, rows in ((2.0, 100), (4.0, 130), (6.0, 135)):
        history.record(t, [EXPERT], {"expert-c0-e0": {"expert_tokens": {"1:0": rows}}})
    assert history.expert_recent == {0: {"1:0": 35}}  # 0 at first sight, then +30 and +5


def _status() -> dict:
    load = {"step_latency_p50_s": 0.012, "step_latency_p99_s": 0.03, "tokens_per_s": 12.5, "queue_depth": 0,
            "kv_blocks_used": 4, "kv_blocks_total": 16, "busy_fraction": 0.25, "bubble_fraction": 0.5,
            "bytes_sent": 4096, "micro_batches_per_s": 3.0}
    stage = {"role": "stage", "chain": 0, "stage": 0, "layers": [0, 2], "experts": {}, "address": "h:1",
             "device": "cpu", "healthy": True, "tp_size": 1, "heartbeat_age_s": 0.4, "load": load}
    return {"model": "</script><b>m</b>", "version": "0.1.0",
            "chains": [{"id": 0, "healthy": True, "num_stages": 1, "requests_served": 5, "requests_running": 1,
                        "requests_waiting": 0}],
            "workers": [stage],
            "gateway": {"ready": True, "chains": [{"id": 0, "kv_blocks_reserved": 2, "kv_blocks_total": 16,
                                                  "steps_in_flight": 1}]}}


def test_the_page_is_rendered_with_the_current_values_and_the_documents_embedded():
    history = History(None, SimpleNamespace(chains=[_chain()]), TokenLatencies())
    history.record(1.0, [STAGE0], {"stage-c0-s0": _stage(0.9, [[0.5, 0.6]])})
    timeline = build_timeline([STAGE0], {"stage-c0-s0": _stage(0.9, [[0.5, 0.6]])}, now=1.0)
    page = render_page(_status(), history.to_json(), timeline)

    row = re.search(r'<tr class="worker up" data-address="h:1" data-role="stage" data-health="up">(.*?)</tr>',
                    page, re.DOTALL)
    assert row, page
    cells = re.sub(r"<[^>]+>", "|", row.group(1))
    for text in ("stage c0-s0", "layers [0, 2)", "12.0 ms / 30.0 ms", "12.5", "4 / 16", "25%", "50%", "4.0 KiB"):
        assert text in cells, (text, cells)
    assert re.search(r'<tr data-chain="0" class="up">', page) and "gateway ready" in page
    assert "<b>m</b>" not in page  # every value is escaped, in the HTML and in the embedded JSON
    embedded = re.search(r'<script id="initial-data" type="application/json">(.*?)</script>', page, re.DOTALL).group(1)
    data = json.loads(embedded)
    assert data["status"]["model"] == "</script><b>m</b>"
    assert data["history"]["chains"][0]["t"] == [1.0] and data["timeline"]["chains"][0]["stages"][0]["steps"]
    for script in ("charts.js", "timeline.js", "dashboard.js"):
        assert f'<script src="/static/{script}"></script>' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org', "") and "https://" not in page  # offline
