"""`stagemesh bench --device cuda` end to end: a mesh whose stage runs on cuda:0, the in-process
engine and transformers on the same GPU, one tiny load; the figures of a GPU run and the greedy
tokens of the in-process engine."""

from __future__ import annotations

import json

import pytest

from tests.checkpoints import make_hf_checkpoint
from tests.cli_helpers import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

REQUESTS, OUTPUT_LEN = 8, 8
SYSTEM_KEYS = {"wall_s", "output_tokens", "output_tokens_per_s", "steps", "weight_bytes_per_s",
               "bandwidth_fraction", "roofline_fraction", "token_ids"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(the JSON document, the mesh's log folder)."""
    tmp = tmp_path_factory.mktemp("bench")
    model = make_hf_checkpoint("llama", tmp / "llama")
    proc = run_cli(
        "bench", "--model", str(model), "--device", "cuda", "--requests", str(REQUESTS), "--input-len", "4",
        "--input-len-max", "40", "--output-len", str(OUTPUT_LEN), "--compare", "hf,inprocess", "--json",
        "--calibrate-s", "0.5", "--log-dir", str(tmp / "logs"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), tmp / "logs"


def test_the_json_document_has_the_figures_of_a_gpu_run(bench):
    doc, _ = bench
    machine = doc["machine"]
    assert machine["kind"] == "cuda" and machine["device_name"] and machine["peak_bytes_per_s"] > 1e10, machine
    assert doc["config"]["device"] == "cuda"
    assert set(doc["systems"]) == {"mesh", "inprocess", "hf"}
    assert set(doc["ratios"]) == {"mesh/hf", "mesh/inprocess"}
    for name, system in doc["systems"].items():
        assert SYSTEM_KEYS <= set(system), (name, SYSTEM_KEYS - set(system))
        assert system["output_tokens"] == REQUESTS * OUTPUT_LEN and system["output_tokens_per_s"] > 0, name
        assert 0 < system["bandwidth_fraction"] == system["roofline_fraction"], name  # weight bytes on CUDA
    mesh = doc["systems"]["mesh"]
    assert mesh["ttft_s"]["p50"] >= 0 and mesh["itl_s"]["p99"] >= mesh["itl_s"]["p50"]
    assert [s["worker"] for s in mesh["stages"]] == ["stage-c0-s0"]


def test_the_mesh_stage_ran_on_the_gpu(bench):
    _, logs = bench
    text = "\n".join(f.read_text(errors="replace") for f in logs.rglob("*") if f.is_file())
    assert "serving layers" in text and "on cuda:0" in text, text[-3000:]


def test_the_mesh_on_cuda_gives_the_in_process_engines_greedy_tokens(bench):
    doc, _ = bench
    assert doc["systems"]["mesh"]["token_ids"] == doc["systems"]["inprocess"]["token_ids"]
    assert doc["greedy_match"]["mesh/inprocess"] == 1.0
    assert [len(ids) for ids in doc["systems"]["hf"]["token_ids"]] == [OUTPUT_LEN] * REQUESTS
