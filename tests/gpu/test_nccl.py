"""NCCL: a stage's TP group joined over nccl with one rank (its collectives on GPU tensors, and a
TP=1 stage stepped through the TP path, ``TPStage``), and — where two GPUs are visible — TP=2
over nccl giving transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stage_worker.build import StageOptions, build_runner
from stage_worker.decode import StageStep
from stage_worker.stage import launch_tp
from stage_worker.topology import StagePlace
from stage_worker.tp import join_group, leave_group
from stagemesh.config import StageSpec
from stagemesh.deploy.redis_server import free_port
from stagemesh.runners.stage import StageRunner
from tests.checkpoints import hf_model, make_hf_checkpoint, teacher_forcing_check
from tests.gpu.runs import BLOCK_SIZE, FLOAT32_TOL, KV_BLOCKS, greedy, prompts, runner_tokens

pytestmark = pytest.mark.gpu

NUM_LAYERS, NEW_TOKENS = 3, 6


def stage_place(model_dir, devices: tuple[str, ...]) -> StagePlace:
    """The whole model as one stage of one chain, a TP rank on each of ``devices`` (backend: nccl, from the device)."""
    return StagePlace(
        chain=0, stage=0, num_stages=1, spec=StageSpec.whole(NUM_LAYERS), address="127.0.0.1:0", device=devices[0],
        model=str(model_dir), block_size=BLOCK_SIZE, dtype="float32", kv_blocks=KV_BLOCKS, next_address=None,
        tp=len(devices), devices=devices,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def tp1_tokens(model_dir) -> list[list[int]]:
    """The plain runner on cuda:0 (no process group at all)."""
    runner = StageRunner(model_dir, StageSpec.whole(NUM_LAYERS), device="cuda:0", num_kv_blocks=KV_BLOCKS,
                         block_size=BLOCK_SIZE)
    return greedy(runner_tokens(runner), prompts(320), NEW_TOKENS)


def test_one_rank_nccl_group_reduces_on_the_gpu_and_steps_like_the_plain_runner(model_dir, tp1_tokens):
    _, build = launch_tp(stage_place(model_dir, ("cuda:0",)), StageOptions())
    stage = build()  # joins the group as rank 0 of 1 and loads the weights
    try:
        assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
        assert dist.get_backend(stage.group.control) == "gloo"
        x = torch.arange(6.0, device="cuda:0")
        dist.all_reduce(x, group=stage.group.tp.group)  # a world of one: the sum is x itself
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x, group=stage.group.tp.group)
        assert torch.equal(x.cpu(), torch.arange(6.0)) and torch.equal(parts[0], x)
        got = greedy(lambda plan: stage.step(StageStep(plan)).tokens, prompts(320), NEW_TOKENS)
        assert stage.failure() is None
    finally:
        stage.close()  # STOP on the control group, then leaves the group
    assert got == tp1_tokens
    assert not dist.is_initialized()


def _tp2_rank(rank: int, model_dir: str, port: int, out: dict) -> None:
    """One of two ranks: every rank runs the same plans, so their all-reduces meet."""
    place = stage_place(model_dir, ("cuda:0", "cuda:1"))
    group = join_group(rank, 2, f"tcp://127.0.0.1:{port}", "nccl", place.devices[rank])
    try:
        runner = build_runner(place, StageOptions(), place.devices[rank], group.tp)
        out[rank] = greedy(runner_tokens(runner), prompts(320), NEW_TOKENS)
    finally:
        leave_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 over nccl needs two GPUs")
def test_tp2_over_nccl_gives_transformers_tokens(model_dir):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_tp2_rank, args=(str(model_dir), free_port(), out), nprocs=2, join=True)
        got = dict(out)
    assert got[0] == got[1], "the two ranks sampled different tokens"
    reference = hf_model(model_dir)  # partial sums in another order: near-ties may break otherwise than TP=1
    for n, (prompt, generated) in enumerate(zip(prompts(320), got[0])):
        teacher_forcing_check(reference, prompt, generated, FLOAT32_TOL, request=f"tp=2 request {n}")
