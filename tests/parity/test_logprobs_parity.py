"""Log-probabilities from the last stage equal transformers' (teacher forcing, float32): the
log-probability of each generated token and the top-k at its position are log_softmax of the
reference's logits there, within 1e-4, on pp=1 and pp=2, greedy and sampled.

NOTE: log-probabilities of the model's own distribution, as vLLM returns by default: a request
sampled at temperature 0.7 with top_k=3 gets the same log-probabilities as a greedy one would
at that position, not those of the tempered, filtered distribution it was drawn from.
"""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import hf_model, make_hf_checkpoint
from tests.cli_helpers import generate_json, write_jsonl

TOP = 5
TOL = 1e-4
REQUESTS = [{**r, "ignore_eos": True} for r in [
    {"token_ids": [5, 9, 2, 7, 3, 11, 40], "max_new_tokens": 8, "logprobs": True, "top_logprobs": TOP},
    {"token_ids": [17, 4], "max_new_tokens": 5, "logprobs": True},  # the generated token's own only
    {"token_ids": [8, 8, 1, 6, 2, 9, 4, 33, 61, 2, 5], "max_new_tokens": 6},  # no logprobs, in the same batch
    {"token_ids": [21, 3, 99], "max_new_tokens": 7, "logprobs": True, "top_logprobs": TOP, "temperature": 0.7,
     "top_k": 3, "seed": 12},
]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=4)


def check_against_transformers(reference, request: dict, result: dict, what: str) -> None:
    prompt, generated = request["token_ids"], result["token_ids"]
    ids = list(prompt) + generated[:-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]
    assert len(result["logprobs"]) == len(generated)
    for j, (token, ours) in enumerate(zip(generated, result["logprobs"])):
        row = logprobs[len(prompt) - 1 + j]
        assert ours["logprob"] == pytest.approx(float(row[token]), abs=TOL), f"{what}: token {j}"
        top = ours["top_logprobs"]
        assert len(top) == request.get("top_logprobs", 0)
        theirs = row.topk(len(top))
        assert [v for _, v in top] == pytest.approx(theirs.values.tolist(), abs=TOL), f"{what}: top of token {j}"
        for t, v in top:  # ids may differ only where two values tie within the tolerance
            assert v == pytest.approx(float(row[t]), abs=TOL)


@pytest.mark.parametrize("pp", ["1", "2"])
def test_logprobs_match_transformers(model_dir, pp, tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", REQUESTS)
    results = generate_json("--model", str(model_dir), "--input", str(inputs), "--pp", pp, "--block-size", "4",
                            "--max-batch-tokens", "16")
    reference = hf_model(model_dir)
    for n, (request, result) in enumerate(zip(REQUESTS, results)):
        assert len(result["token_ids"]) == request["max_new_tokens"]
        if not request.get("logprobs"):
            assert "logprobs" not in result
            continue
        check_against_transformers(reference, request, result, f"pp={pp} request {n}")
