"""TP=2 against TP=1 on CPU with gloo: the same tokens and hidden states, half the weights per rank.

Real torch.distributed: two spawned processes join a gloo group over 127.0.0.1.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagemesh.config import ModelConfig, StageSpec
from stagemesh.model.parallel import TPGroup
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan
from tests.checkpoints import make_hf_checkpoint

GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0, logprobs=True, top_logprobs=3)
PROMPTS = [[5, 9, 17, 33, 2, 8, 101], [44, 3], [7, 7, 7, 12, 90, 61, 30, 29, 11, 4, 3]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(runner: StageRunner, steps: int) -> tuple[list[list[int]], list[float]]:
    """Greedy prefill of PROMPTS then ``steps`` decodes, plans written by hand; the tokens, and
    every log-probability returned (the tokens' and their top 3's), flat."""
    seqs, logprobs = [list(p) for p in PROMPTS], []
    plan = StepPlan(0, tuple(SeqChunk(i, 0, tuple(p), GREEDY) for i, p in enumerate(seqs)))
    for step in range(steps + 1):
        result = runner.step(plan, None)
        for i in range(len(seqs)):
            seqs[i].append(result.tokens[i])
            logprobs += [result.logprobs[i].logprob, *(v for _, v in result.logprobs[i].top)]
        plan = StepPlan(step + 1, tuple(SeqChunk(i, len(s) - 1, (s[-1],), GREEDY) for i, s in enumerate(seqs)))
    return [s[len(p) :] for s, p in zip(seqs, PROMPTS)], logprobs


def _hidden(runner: StageRunner) -> torch.Tensor:
    plan = StepPlan(0, tuple(SeqChunk(i, 0, tuple(p)) for i, p in enumerate(PROMPTS)))
    return runner.step(plan, None)


def _weight_bytes(runner: StageRunner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())


def _rank_main(rank: int, world: int, port: int, model_dir: str, out: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = ModelConfig.from_dir(model_dir).num_hidden_layers
        tp = TPGroup(rank, world, dist.group.WORLD)
        whole = StageRunner(model_dir, StageSpec.whole(n), tp=tp, num_kv_blocks=64, block_size=4)
        first = StageRunner(model_dir, StageSpec(0, n - 1, n), tp=tp, num_kv_blocks=64, block_size=4)
        result = {"tokens": _generate(whole, 4), "hidden": _hidden(first), "bytes": _weight_bytes(whole)}
        if rank == 0:
            out.update(result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "qwen2_moe"])
def test_tp2_matches_tp1(family, tmp_path):
    model_dir = str(make_hf_checkpoint(family, tmp_path / family, num_layers=3))
    n = ModelConfig.from_dir(model_dir).num_hidden_layers
    whole = StageRunner(model_dir, StageSpec.whole(n), num_kv_blocks=64, block_size=4)
    first = StageRunner(model_dir, StageSpec(0, n - 1, n), num_kv_blocks=64, block_size=4)
    want_tokens, want_hidden, full_bytes = _generate(whole, 4), _hidden(first), _weight_bytes(whole)

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(2, _free_port(), model_dir, out), nprocs=2, join=True)
        got = dict(out)

    assert got["tokens"][0] == want_tokens[0]
    assert got["tokens"][1] == pytest.approx(want_tokens[1], abs=1e-5)  # logprobs: vocab-parallel lm_head too
    torch.testing.assert_close(got["hidden"], want_hidden, rtol=1e-5, atol=1e-5)
    # Each rank holds about half the weights: only norms, routers and the like are replicated.
    assert got["bytes"] < 0.56 * full_bytes, (got["bytes"], full_bytes)
