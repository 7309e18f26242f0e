"""`stagemesh generate --model` gives transformers' greedy tokens (teacher forcing), per family.

Prompts of different lengths and different max_new_tokens all run together through
continuous batching; small KV blocks and a small step budget force paged attention across
blocks and chunked prefill.
"""

from __future__ import annotations

import random

import pytest

from stagemesh.tokenizer import Tokenizer
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.cli_helpers import generate_json, write_jsonl

CASES = [
    ("llama", {}, ["--pp", "1"]),
    ("qwen2", {}, ["--pp", "2"]),
    ("mistral", {}, ["--pp", "1"]),  # sliding window 8, prompts longer than it
    ("mixtral", {}, ["--pp", "2"]),
    ("qwen2_moe", {"norm_topk_prob": False}, ["--pp", "1"]),
    ("qwen2_moe", {"norm_topk_prob": True}, ["--pp", "3"]),
]


def _requests(vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    lengths = [1, 5, 17, 40, 9, 63]
    new_tokens = [12, 3, 20, 7, 1, 16]
    return [
        {"token_ids": [rng.randrange(2, vocab) for _ in range(n)], "max_new_tokens": m}
        for n, m in zip(lengths, new_tokens)
    ]


@pytest.mark.parametrize("family,overrides,layout", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_greedy_tokens_match_transformers(family, overrides, layout, tmp_path):
    model_dir = make_hf_checkpoint(family, tmp_path / "model", num_layers=4, shards=2, **overrides)
    requests = _requests(320, seed=len(family))
    requests.append({"prompt": "The quick brown fox", "max_new_tokens": 8})
    inputs = write_jsonl(tmp_path / "in.jsonl", requests)

    results = generate_json(
        "--model", str(model_dir), "--input", str(inputs), *layout, "--block-size", "4", "--max-batch-tokens", "32"
    )

    assert len(results) == len(requests)
    reference = hf_model(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    for n, (req, res) in enumerate(zip(requests, results)):
        prompt = req.get("token_ids") or tokenizer.encode(req["prompt"])
        generated = res["token_ids"]
        # EOS may end a request early; otherwise it runs to max_new_tokens.
        if res["finish_reason"] == "length":
            assert len(generated) == req["max_new_tokens"]
        else:
            assert res["finish_reason"] == "stop" and generated[-1] == 1
        teacher_forcing_check(reference, prompt, generated, request=f"{family} request {n}")
