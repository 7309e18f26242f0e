"""A ``StageRunner`` on ``cuda:0``: bfloat16 weights where asked, and transformers' logits and
greedy tokens (float32, teacher-forced), family by family."""

from __future__ import annotations

import pytest
import torch

from stagemesh.config import StageSpec
from stagemesh.runners.stage import StageRunner
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.gpu.runs import (
    BLOCK_SIZE,
    FLOAT32_TOL,
    KV_BLOCKS,
    greedy,
    hf_logits,
    prompt_logits,
    prompts,
    runner_tokens,
)

pytestmark = pytest.mark.gpu

NUM_LAYERS, NEW_TOKENS = 4, 8
BF16_TOL = 0.25
"""Max |logit| difference of bfloat16 on CUDA against transformers in float32 (dense llama; logits ~ N(0, 1)).
On CPU the same comparison gives 0.08 for the logits and 0.004 for the worst teacher-forced gap."""
FAMILIES = ("llama", "qwen2", "mistral", "mixtral", "qwen2_moe")


def cuda_runner(model_dir, dtype: str) -> StageRunner:
    return StageRunner(model_dir, StageSpec.whole(NUM_LAYERS), device="cuda:0", dtype=dtype,
                       num_kv_blocks=KV_BLOCKS, block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=NUM_LAYERS)


def test_bfloat16_load_puts_every_weight_and_the_kv_cache_on_the_gpu(llama_dir):
    runner = cuda_runner(llama_dir, "bfloat16")
    params = dict(runner.model.named_parameters())
    assert params, "the stage has no parameters"
    misplaced = {n: (str(p.device), p.dtype) for n, p in params.items()
                 if p.device != torch.device("cuda:0") or p.dtype != torch.bfloat16 or p.is_mkldnn}
    assert not misplaced, f"weights not bfloat16 on cuda:0: {misplaced}"
    for name, buf in runner.model.named_buffers():  # the rotary tables stay float32, on the GPU
        assert buf.device == torch.device("cuda:0"), name
    assert runner.cache.kv.device == torch.device("cuda:0") and runner.cache.kv.dtype == torch.bfloat16


def test_bfloat16_on_cuda_stays_within_bfloat16_of_transformers(llama_dir):
    runner, reference = cuda_runner(llama_dir, "bfloat16"), hf_model(llama_dir)
    batch = prompts(320)
    for prompt in batch:
        diff = (prompt_logits(runner, prompt).cpu() - hf_logits(reference, prompt)).abs().max()
        assert diff <= BF16_TOL, f"prompt of {len(prompt)} tokens: bfloat16 logits off by {float(diff):.4f}"
    for n, (prompt, generated) in enumerate(zip(batch, greedy(runner_tokens(runner), batch, NEW_TOKENS))):
        teacher_forcing_check(reference, prompt, generated, BF16_TOL, request=f"bfloat16 request {n}")


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_on_cuda_gives_transformers_logits_and_greedy_tokens(family, tmp_path):
    model_dir = make_hf_checkpoint(family, tmp_path / family, num_layers=NUM_LAYERS)
    runner, reference = cuda_runner(model_dir, "float32"), hf_model(model_dir)
    batch = prompts(320, seed=len(family))
    for prompt in batch:
        diff = (prompt_logits(runner, prompt).cpu() - hf_logits(reference, prompt)).abs().max()
        assert diff <= FLOAT32_TOL, f"{family}, prompt of {len(prompt)} tokens: logits off by {float(diff):.2e}"
    for n, (prompt, generated) in enumerate(zip(batch, greedy(runner_tokens(runner), batch, NEW_TOKENS))):
        assert len(generated) == NEW_TOKENS
        teacher_forcing_check(reference, prompt, generated, FLOAT32_TOL, request=f"{family} request {n}")
