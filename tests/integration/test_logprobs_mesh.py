"""Log-probabilities through a real mesh (``stagemesh up --pp 2 --http-port``): the last stage's
log-probabilities travel back through the gateway and a frontend to the SDK and to the OpenAI
API, and equal transformers' log_softmax (teacher forcing, float32) within 1e-4.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

from stagemesh import Client
from stagemesh.deploy.redis_server import free_port
from tests.checkpoints import hf_model, make_hf_checkpoint
from tests.integration.mesh_helpers import stagemesh_up

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
PROMPT = "The quick brown fox"
TOL = 1e-4


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    model = make_hf_checkpoint("llama", root / MODEL, num_layers=4)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    http_port = free_port()
    with stagemesh_up(model, root / "logs", "--pp", "2", "--http-port", str(http_port)) as (addr, _, _):
        yield addr, f"http://127.0.0.1:{http_port}", model


def reference_logprobs(model, prompt: list[int], generated: tuple[int, ...]) -> torch.Tensor:
    """[len(generated), V]: transformers' log_softmax at each generated token's position."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(generated[:-1])])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1:]


def test_the_sdk_gets_transformers_logprobs_streamed_and_not(mesh):
    addr, _, model_dir = mesh
    with Client(addr, timeout=120) as sdk:
        prompt = [5, 9, 2, 7, 3, 11]
        greedy = sdk.generate(token_ids=prompt, max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5)
        sampled = sdk.generate(token_ids=prompt, max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=2,
                               temperature=0.8, top_k=4, seed=7)
        items = list(sdk.stream(token_ids=prompt, max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5))
        plain = sdk.generate(token_ids=prompt, max_new_tokens=3)
    assert plain.logprobs is None
    assert [t.logprobs for t in items if t.token_id is not None] == list(greedy.logprobs)
    reference = hf_model(model_dir)
    for result, top in ((greedy, 5), (sampled, 2)):
        assert len(result.logprobs) == len(result.token_ids) == 8
        rows = reference_logprobs(reference, prompt, result.token_ids)
        for token, lp, row in zip(result.token_ids, result.logprobs, rows):
            assert lp.logprob == pytest.approx(float(row[token]), abs=TOL)  # the model's own, not the tempered one
            assert [v for _, v in lp.top] == pytest.approx(row.topk(top).values.tolist(), abs=TOL)
            assert all(v == pytest.approx(float(row[t]), abs=TOL) for t, v in lp.top)


def test_the_openai_api_gives_the_same_logprobs_as_the_sdk(mesh):
    addr, url, _ = mesh
    with Client(addr, timeout=120) as sdk:
        grpc = sdk.generate(PROMPT, max_new_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=3)
    own = [lp.logprob for lp in grpc.logprobs]
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as oa:
        kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3,
                  extra_body={"ignore_eos": True})
        whole = oa.completions.create(**kw).choices[0]
        pieces = [c.choices[0].logprobs for c in oa.completions.create(**kw, stream=True) if c.choices[0].logprobs]
        chat_kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0,
                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
        chat = oa.chat.completions.create(**chat_kw).choices[0]
        chat_pieces = [e for c in oa.chat.completions.create(**chat_kw, stream=True)
                       if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert whole.text == grpc.text
    assert whole.logprobs.token_logprobs == pytest.approx(own, abs=TOL)
    assert [v for p in pieces for v in p.token_logprobs] == pytest.approx(own, abs=TOL)
    # the top 3 and the generated token, keyed by text: two byte tokens that both decode to "\ufffd" make one
    assert all(1 <= len(top) <= 4 for top in whole.logprobs.top_logprobs)
    assert all(max(top.values()) >= v - TOL for top, v in zip(whole.logprobs.top_logprobs, own))
    assert len(chat.logprobs.content) == 6 and all(len(e.top_logprobs) == 3 for e in chat.logprobs.content)
    assert [e.token for e in chat_pieces] == [e.token for e in chat.logprobs.content]
    assert [e.logprob for e in chat_pieces] == pytest.approx([e.logprob for e in chat.logprobs.content], abs=TOL)
    assert all(e.logprob <= e.top_logprobs[0].logprob + TOL for e in chat.logprobs.content)
