"""The KServe v2 / Triton gRPC service of a real ``stagemesh up`` mesh (tiny llama, pp=1), on the
same client port as ``stagemesh.v1.Gateway``, driven by the real ``tritonclient[grpc]``.

tritonclient pins ``protobuf<7`` and this project needs 7, so the client runs in its own virtual
environment, ``.venv-triton`` (``.ci/run`` makes it), as tests/integration/kserve_client.py,
and this test reads its JSON. Without that environment the test is skipped, with the reason.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from stagemesh import Client
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import stagemesh_up

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
MODEL = "tiny-llama"
PROMPT = "The quick brown fox"
MAX_TOKENS = 12


@pytest.mark.skipif(not TRITON_PYTHON.exists(), reason=(
    "no .venv-triton: tritonclient needs protobuf<7, so it has its own environment; make it with "
    "python3 -m venv .venv-triton && .venv-triton/bin/pip install 'tritonclient[grpc]' (as .ci/run does)"))
def test_tritonclient_against_a_mesh(tmp_path):
    model = make_hf_checkpoint("llama", tmp_path / MODEL, num_layers=2, max_position_embeddings=512)
    with stagemesh_up(model, tmp_path / "logs") as (addr, _, _):
        with Client(addr) as client:
            expected = client.generate(PROMPT, max_new_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        run = subprocess.run([str(TRITON_PYTHON), str(ROOT / "tests/integration/kserve_client.py"), addr, MODEL,
                              PROMPT, str(MAX_TOKENS)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)

    assert seen["live"] and seen["ready"] and seen["model_ready"] and seen["decoupled"]
    assert "text_input" in seen["inputs"] and seen["outputs"][0] == "text_output"
    assert seen["infer"] == {"text": expected.text, "finish_reason": "length", "num_input_tokens": seen["infer"][
        "num_input_tokens"], "num_output_tokens": MAX_TOKENS}
    assert seen["infer"]["num_input_tokens"] > 0
    stream = seen["stream"]
    assert stream["errors"] == [] and "".join(stream["chunks"]) == expected.text
    assert stream["finals"][-1] is True and not any(stream["finals"][:-1])
    assert seen["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "unknown model 'no-such-model'" in seen["unknown_model"]["message"]
    assert seen["bad_parameters"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "max_new_tokens" in seen["bad_parameters"]["message"]
