"""`stagemesh bench` end to end: a real mesh, the in-process engine and transformers on one tiny load."""

from __future__ import annotations

import json

import pytest

from tests.checkpoints import make_hf_checkpoint
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.slow

SYSTEM_KEYS = {"wall_s", "output_tokens", "output_tokens_per_s", "steps", "achieved_flops_per_s", "roofline_fraction", "token_ids"}


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model = make_hf_checkpoint("llama", tmp / "llama")
    proc = run_cli(
        "bench", "--model", str(model), "--requests", "6", "--input-len", "4", "--output-len", "4",
        "--compare", "hf,inprocess", "--json", "--calibrate-s", "0.2", "--log-dir", str(tmp / "logs"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_json_document_has_every_figure(doc):
    assert {"config", "model", "workload", "machine", "systems", "ratios", "greedy_match"} <= set(doc)
    assert set(doc["systems"]) == {"mesh", "inprocess", "hf"}
    assert set(doc["ratios"]) == {"mesh/hf", "mesh/inprocess"}
    assert doc["workload"]["requests"] == 6 and doc["workload"]["output_tokens"] == 24
    assert doc["machine"]["kind"] == "cpu" and doc["machine"]["peak_flops_per_s"] > 0
    for name, system in doc["systems"].items():
        assert SYSTEM_KEYS <= set(system), (name, SYSTEM_KEYS - set(system))
        assert system["output_tokens"] == 24 and system["output_tokens_per_s"] > 0, name
        assert [len(ids) for ids in system["token_ids"]] == [4] * 6, name
    mesh = doc["systems"]["mesh"]
    for figure in ("ttft_s", "itl_s"):
        assert mesh[figure]["p50"] >= 0 and mesh[figure]["p99"] >= mesh[figure]["p50"]
    assert [s["worker"] for s in mesh["stages"]] == ["stage-c0-s0"]
    assert 0 < mesh["stages"][0]["busy_fraction"] <= 1 and 0 <= mesh["bubble"] < 1


def test_the_mesh_gives_the_in_process_engines_greedy_tokens(doc):
    assert doc["systems"]["mesh"]["token_ids"] == doc["systems"]["inprocess"]["token_ids"]
    assert doc["greedy_match"]["mesh/inprocess"] == 1.0
