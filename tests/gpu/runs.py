"""What the CUDA tests share: greedy generation by hand-written plans, a prompt's logits, checks.

Every runner under test (a ``StageRunner``, a ``LocalChain``, a stage worker behind a stream,
a ``TPStage``) is driven through ``greedy``, which only needs "run this plan, give me the
sampled tokens": the same prompts and the same plans reach every one of them.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import torch

from stagemesh.model.attention import AttnMetadata
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan

GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0)
PROMPT_LENGTHS = (1, 5, 17, 40)  # a one-token prompt (a decode-shaped chunk), and prompts over 1-3 KV blocks of 16
BLOCK_SIZE = 16
KV_BLOCKS = 64
FLOAT32_TOL = 1e-3
"""Max |logit| difference against transformers in float32: CUDA kernels sum in other orders than CPU ones."""


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def greedy(run: Callable[[StepPlan], dict[int, int]], prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """``new_tokens`` greedy tokens per prompt: one step prefilling every prompt, then one
    decode step per token for all of them together. ``run``: a plan -> its sampled tokens."""
    seqs = {i: list(p) for i, p in enumerate(prompts)}
    plan = StepPlan(0, tuple(SeqChunk(i, 0, tuple(ids), GREEDY) for i, ids in seqs.items()))
    for step_id in range(1, new_tokens + 1):
        tokens = run(plan)
        assert set(tokens) == set(seqs), f"step {plan.step_id} sampled for {sorted(tokens)}, not {sorted(seqs)}"
        for seq_id, token in tokens.items():
            seqs[seq_id].append(token)
        plan = StepPlan(step_id, tuple(
            SeqChunk(i, len(ids) - 1, (ids[-1],), dataclasses.replace(GREEDY, index=len(ids) - len(prompts[i])))
            for i, ids in seqs.items()
        ))
    return [ids[len(p):] for ids, p in zip(seqs.values(), prompts)]


def runner_tokens(runner: StageRunner) -> Callable[[StepPlan], dict[int, int]]:
    """``greedy``'s ``run`` for a single-stage runner."""
    return lambda plan: runner.step(plan, None).tokens


def prompt_logits(runner: StageRunner, prompt: list[int], seq_id: int = 999) -> torch.Tensor:
    """float32 [T, V] logits of every position of ``prompt``, through a whole-model runner (one prefill)."""
    table = runner.cache.ensure(seq_id, len(prompt))
    meta = AttnMetadata.build([0], [len(prompt)], [table], runner.cache.block_size, runner.device,
                              runner.config.sliding_window, runner.dtype)
    hidden = runner.model(torch.tensor(prompt, device=runner.device), meta, runner.cache)  # [T, H]
    logits = runner.model.logits(hidden)
    runner.cache.free(seq_id)
    return logits


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    """transformers' float32 [T, V] logits of ``prompt`` (on CPU)."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()
