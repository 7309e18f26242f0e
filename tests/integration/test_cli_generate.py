"""`stagemesh generate --model` as a user runs it: KV budget behaviour and bad input."""

from __future__ import annotations

import json

import pytest

from tests.checkpoints import make_hf_checkpoint
from tests.cli_helpers import generate_json, run_cli, write_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=2, max_position_embeddings=64)


def test_more_requests_than_the_kv_budget_wait_and_all_complete(model_dir, tmp_path):
    # 8 blocks of 4 tokens = 32 tokens of KV: each request reserves 10..20, so at most 2 run at once
    requests = [{"token_ids": list(range(3, 3 + n)), "max_new_tokens": 10} for n in (2, 5, 8, 10, 3, 6)]
    inputs = write_jsonl(tmp_path / "in.jsonl", requests)
    tight = generate_json("--model", str(model_dir), "--input", str(inputs), "--kv-blocks", "8", "--block-size", "4")
    roomy = generate_json("--model", str(model_dir), "--input", str(inputs))
    assert [r["token_ids"] for r in tight] == [r["token_ids"] for r in roomy]
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 10 or r["finish_reason"] == "stop" for r in tight)


def test_a_request_that_can_never_fit_is_refused_and_the_others_complete(model_dir, tmp_path):
    requests = [{"token_ids": [5, 6, 7], "max_new_tokens": 4}, {"token_ids": list(range(3, 23)), "max_new_tokens": 30}]
    inputs = write_jsonl(tmp_path / "in.jsonl", requests)
    proc = run_cli(
        "generate", "--model", str(model_dir), "--input", str(inputs), "--kv-blocks", "8", "--block-size", "4", "--json"
    )
    assert proc.returncode == 1
    ok, refused = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(ok["token_ids"]) == 4
    assert refused["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert "50" in refused["error"]["message"] and "32" in refused["error"]["message"]
    assert "Traceback" not in proc.stderr


BAD = [
    (["--token-ids", "5,99999"], "99999"),
    (["--prompt", ""], "empty"),
    (["--token-ids", "5,6", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--token-ids", "5,6", "--temperature", "-1"], "temperature"),
    (["--token-ids", "5,6", "--top-p", "0"], "top_p"),
    (["--token-ids", "5,6", "--top-p", "1.5"], "top_p"),
    (["--token-ids", ",".join(["7"] * 64)], "context"),
    (["--token-ids", "a,b"], "--token-ids"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[n for _, n in BAD])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(model_dir, args, needle):
    proc = run_cli("generate", "--model", str(model_dir), *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "INVALID_ARGUMENT" in lines[0] and needle in lines[0], lines[0]


def test_bad_jsonl_line_names_the_line(model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"token_ids": [1, 2]}\n{"prompt": "a", "token_ids": [1]}\n')
    proc = run_cli("generate", "--model", str(model_dir), "--input", str(path))
    assert proc.returncode != 0 and "line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "nope"), "--token-ids", "1,2")
    assert proc.returncode != 0 and "config.json" in proc.stderr and "Traceback" not in proc.stderr
