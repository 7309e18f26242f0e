"""Layout parity through the OpenAI API: the same requests — greedy and seeded sampling at
temperature 1.0, one prompt and a batch of prompts, streamed and not — give identical
completions and usage on pp=1 and on pp=2 x dp=2 for a dense checkpoint, and on pp=1 and
pp=2 x ep=2 for a MoE one. Real `stagemesh up --http-port` meshes, the real ``openai`` client.

Log-probabilities (``logprobs``) agree within 1e-4, not bit for bit: a layout sums in another
order (layers split over processes, other batch neighbours), which moves float32 logits a little.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from stagemesh.deploy.redis_server import free_port
from tests.checkpoints import make_hf_checkpoint
from tests.integration.mesh_helpers import stagemesh_up

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Once upon a time", "stagemesh", "1 2 3 4"]
REQUESTS = [
    {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0},
    {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "seed": 11},
    {"prompt": PROMPTS, "max_tokens": 10, "temperature": 0},
    {"prompt": PROMPTS[2:], "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 2},
    {"prompt": PROMPTS[:2], "max_tokens": 8, "temperature": 0, "logprobs": 2},
]
"""Greedy and seeded, single and batched; each is sent streamed and not."""


def answers(url: str) -> tuple[list, list]:
    """Every request's choices (index, text, finish reason) and usage, non-streamed then streamed;
    and the token log-probabilities of each choice that asked for them, in the same order."""
    out, logprobs = [], []
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        for request in REQUESTS:
            args = {**request, "model": model, "extra_body": {"ignore_eos": True}}
            whole = client.completions.create(**args)
            out.append(([(c.index, c.text, c.finish_reason) for c in whole.choices], whole.usage.model_dump()))
            logprobs += [c.logprobs.token_logprobs for c in whole.choices if c.logprobs is not None]
            texts, finishes, usage, streamed = {}, {}, None, {}
            for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + c.text
                    if c.finish_reason is not None:
                        finishes[c.index] = c.finish_reason
                    if c.logprobs is not None:
                        streamed.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
                usage = chunk.usage.model_dump() if chunk.usage is not None else usage
            out.append(([(i, texts[i], finishes[i]) for i in sorted(texts)], usage))
            logprobs += [streamed[i] for i in sorted(streamed)]
    return out, logprobs


def serve(model: Path, logs: Path, *layout: str) -> tuple[list, list]:
    port = free_port()
    with stagemesh_up(model, logs, "--http-port", str(port), *layout):
        return answers(f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("family, other", [("llama", ("--pp", "2", "--dp", "2")),
                                           ("qwen2_moe", ("--pp", "2", "--ep", "2"))], ids=["dense", "moe"])
def test_the_openai_api_gives_the_same_completions_on_every_layout(family, other, tmp_path):
    model = make_hf_checkpoint(family, tmp_path / family, num_layers=4)
    one, one_logprobs = serve(model, tmp_path / "pp1")
    split, split_logprobs = serve(model, tmp_path / "split", *other)
    assert split == one
    assert all(usage["completion_tokens"] == sum(1 for _ in choices) * REQUESTS[i // 2]["max_tokens"]
               for i, (choices, usage) in enumerate(one))
    assert one[0] == one[1] and one[2] == one[3]  # streamed equals non-streamed
    assert len(one_logprobs) == 4 and all(len(lps) == 8 for lps in one_logprobs)  # 2 prompts, whole and streamed
    for ours, theirs in zip(split_logprobs, one_logprobs):
        assert ours == pytest.approx(theirs, abs=1e-4)
