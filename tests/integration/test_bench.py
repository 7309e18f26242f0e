"""`stagemesh bench` end to end: a real mesh, the in-process engine and transformers on one tiny load."""

from __future__ import annotations

import json

import pytest

from tests.checkpoints import make_hf_checkpoint
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.slow

REQUESTS, OUTPUT_LEN = 16, 64
"""1024 output tokens: enough CPU for every process to show in /proc's 10 ms clock ticks."""
TOKENS = REQUESTS * OUTPUT_LEN

SYSTEM_KEYS = {"wall_s", "output_tokens", "output_tokens_per_s", "steps", "achieved_flops_per_s", "roofline_fraction", "token_ids"}


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model = make_hf_checkpoint("llama", tmp / "llama")
    proc = run_cli(
        "bench", "--model", str(model), "--requests", str(REQUESTS), "--input-len", "4", "--output-len", str(OUTPUT_LEN),
        "--compare", "hf,inprocess", "--json", "--calibrate-s", "0.2", "--log-dir", str(tmp / "logs"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_json_document_has_every_figure(doc):
    assert {"config", "model", "workload", "machine", "systems", "ratios", "greedy_match"} <= set(doc)
    assert set(doc["systems"]) == {"mesh", "inprocess", "hf"}
    assert set(doc["ratios"]) == {"mesh/hf", "mesh/inprocess"}
    assert doc["workload"]["requests"] == REQUESTS and doc["workload"]["output_tokens"] == TOKENS
    assert doc["machine"]["kind"] == "cpu" and doc["machine"]["peak_flops_per_s"] > 0
    for name, system in doc["systems"].items():
        assert SYSTEM_KEYS <= set(system), (name, SYSTEM_KEYS - set(system))
        assert system["output_tokens"] == TOKENS and system["output_tokens_per_s"] > 0, name
        assert [len(ids) for ids in system["token_ids"]] == [OUTPUT_LEN] * REQUESTS, name
    mesh = doc["systems"]["mesh"]
    for figure in ("ttft_s", "itl_s"):
        assert mesh[figure]["p50"] >= 0 and mesh[figure]["p99"] >= mesh[figure]["p50"]
    assert [s["worker"] for s in mesh["stages"]] == ["stage-c0-s0"]
    assert 0 < mesh["stages"][0]["busy_fraction"] <= 1 and 0 <= mesh["bubble"] < 1
    stage = mesh["stages"][0]
    assert stage["overhead_ms"] == pytest.approx(stage["step_interval_ms"] - stage["compute_ms"])
    assert stage["compute_ms"] > 0 and stage["step_interval_ms"] > 0


def test_the_mesh_reports_where_its_cpu_went(doc):
    cpu = doc["systems"]["mesh"]["cpu"]
    names = {p["name"] for p in cpu["processes"]}
    assert {"gateway", "stage-c0-s0", "redis", "client"} <= names
    roles = cpu["roles"]
    assert {"gateway", "frontends", "stages", "experts", "redis", "client", "total"} <= set(roles)
    assert roles["gateway"]["cpu_s"] > 0 and roles["stages"]["cpu_s"] > 0
    assert roles["experts"]["processes"] == 0 and roles["total"]["unknown"] == 0
    for role, figures in roles.items():
        assert figures["us_per_token"] == pytest.approx(figures["cpu_s"] / TOKENS * 1e6), role
    assert roles["total"]["cpu_s"] == pytest.approx(sum(p["cpu_s"] for p in cpu["processes"]))


def test_the_mesh_gives_the_in_process_engines_greedy_tokens(doc):
    assert doc["systems"]["mesh"]["token_ids"] == doc["systems"]["inprocess"]["token_ids"]
    assert doc["greedy_match"]["mesh/inprocess"] == 1.0
