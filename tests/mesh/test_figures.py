"""The heartbeat figures: one declaration each, read by the status load, Prometheus and the wire."""

from __future__ import annotations

from dataclasses import fields

import pytest

from stagemesh.mesh.figures import (
    COUNTER,
    GAUGE,
    LOAD_NUMBERS,
    ExpertFigures,
    StageFigures,
    WorkerFigures,
    WorkerLoad,
    figures_of,
)
from stagemesh.v1 import gateway_pb2


def test_figures_round_trip_and_leave_out_what_was_not_published():
    figures = StageFigures(time=1.5, steps=3, busy_fraction=0.25, busy_intervals=[[1.0, 1.2]])
    assert figures.to_json() == {"time": 1.5, "steps": 3, "busy_fraction": 0.25, "busy_intervals": [[1.0, 1.2]]}
    assert StageFigures.from_json(figures.to_json()) == figures
    assert StageFigures().to_json() == {}


def test_each_role_reads_its_own_figures_and_ignores_the_rest():
    doc = {"time": 2.0, "queue_depth": 1, "kv_blocks_used": 3, "expert_tokens": {"1:0": 5}}
    stage, expert = figures_of("stage", doc), figures_of("expert", doc)
    assert isinstance(stage, StageFigures) and (stage.kv_blocks_used, stage.queue_depth) == (3, 1)
    assert isinstance(expert, ExpertFigures) and (expert.expert_tokens, expert.queue_depth) == ({"1:0": 5}, 1)
    assert not hasattr(expert, "kv_blocks_used")
    assert type(figures_of("gateway", doc)) is WorkerFigures


def test_only_a_stage_has_busy_intervals():
    assert StageFigures(busy_intervals=[[0.0, 1.0]]).intervals == [[0.0, 1.0]]
    assert StageFigures().intervals == [] and ExpertFigures(time=1.0).intervals == []


def test_the_prometheus_series_are_those_the_dashboards_use():
    stage = {StageFigures.series(name)[0] for kind in (GAUGE, COUNTER) for name in StageFigures.exported(kind)}
    assert stage == {
        "stagemesh_stage_last_heartbeat_timestamp_seconds", "stagemesh_stage_busy_fraction",
        "stagemesh_stage_queue_depth",
        "stagemesh_stage_kv_blocks_used", "stagemesh_stage_kv_blocks_capacity", "stagemesh_stage_running_sequences",
        "stagemesh_stage_tokens", "stagemesh_stage_steps", "stagemesh_stage_steps_failed", "stagemesh_stage_bytes_sent",
    }
    expert = {ExpertFigures.series(name)[0] for kind in (GAUGE, COUNTER) for name in ExpertFigures.exported(kind)}
    assert expert == {"stagemesh_expert_worker_busy_fraction", "stagemesh_expert_worker_queue_depth",
                      "stagemesh_expert_worker_weight_bytes", "stagemesh_expert_worker_batches",
                      "stagemesh_expert_worker_tokens"}
    assert StageFigures.series("step_latency")[0] == "stagemesh_stage_step_latency_seconds"
    assert StageFigures.series("rank_weight_bytes")[0] == "stagemesh_stage_weight_bytes"
    assert ExpertFigures.series("expert_tokens")[0] == "stagemesh_expert_tokens"


@pytest.mark.parametrize("cls", [StageFigures, ExpertFigures])
def test_every_figure_is_documented(cls):
    assert all(f.metadata["help"].endswith(".") for f in fields(cls))


def test_the_load_copies_the_figures_of_its_names_and_reads_0_for_the_others():
    figures = StageFigures(queue_depth=2, kv_blocks_used=5, busy_fraction=0.5, tokens_processed=None)
    load = WorkerLoad.of(figures, (0.01, 0.02), bubble=0.25)
    assert (load.queue_depth, load.kv_blocks_used, load.busy_fraction, load.tokens_processed) == (2, 5, 0.5, 0)
    assert (load.step_latency_p50_s, load.step_latency_p99_s, load.bubble_fraction) == (0.01, 0.02, 0.25)
    assert "expert_tokens" not in load.to_json()
    expert = WorkerLoad.of(ExpertFigures(expert_tokens={"1:0": 5}, queue_depth=1))
    assert expert.to_json()["expert_tokens"] == {"1:0": 5} and expert.queue_depth == 1
    assert type(WorkerLoad.of(StageFigures(busy_fraction=1)).busy_fraction) is float


def test_the_load_is_the_wire_s_worker_load():
    proto = [f.name for f in gateway_pb2.WorkerLoad.DESCRIPTOR.fields]
    assert sorted(proto) == sorted(f.name for f in fields(WorkerLoad))
    assert set(LOAD_NUMBERS) == set(proto) - {"expert_tokens"}
