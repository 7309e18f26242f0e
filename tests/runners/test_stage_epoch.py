"""A step of a newer gateway incarnation (``StepPlan.epoch``) drops the older one's sequences
before it runs; a step of an older one is refused and changes nothing."""

from __future__ import annotations

import dataclasses
import time

import pytest

from stagemesh.config import StageSpec
from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan
from tests.checkpoints import make_hf_checkpoint

GREEDY = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, index=0)
PROMPT = (5, 9, 2, 7, 3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=2))


def prefill(seq_id: int, epoch: int) -> StepPlan:
    return StepPlan(0, (SeqChunk(seq_id, 0, PROMPT, GREEDY),), epoch=epoch)


def test_a_newer_epoch_drops_the_old_sequences_and_an_older_one_is_refused(model_dir):
    r = StageRunner(model_dir, StageSpec.whole(2), num_kv_blocks=32, block_size=4)
    first = r.step(prefill(0, epoch=100), None).tokens
    r.step(prefill(1, epoch=100), None)
    assert sorted(r.cache.block_tables) == [0, 1] and r.epoch == 100
    # the gateway restarted: its sequence ids start over, and it re-prefills what it took over
    again = r.step(prefill(0, epoch=200), None).tokens
    assert again == first  # a clean sequence 0, not one appended to the old incarnation's KV
    assert sorted(r.cache.block_tables) == [0] and r.cache.blocks_used == 2 and r.epoch == 200
    with pytest.raises(Unavailable, match=r"older gateway \(epoch 100\): a newer gateway") as refused:
        r.step(dataclasses.replace(prefill(5, epoch=100), free=(0,)), None)
    assert "200" not in str(refused.value)  # the refusal does not tell a sender the current epoch
    assert sorted(r.cache.block_tables) == [0]  # nothing of the stale step ran, its free neither


def test_unstamped_steps_run_until_a_gateway_stamps_one_then_are_refused(model_dir):
    r = StageRunner(model_dir, StageSpec.whole(2), num_kv_blocks=32, block_size=4)
    r.step(prefill(0, epoch=0), None)  # in-process engines and tests do not stamp steps
    r.step(prefill(1, epoch=7), None)  # a gateway took over: the unstamped sequences are dropped
    assert sorted(r.cache.block_tables) == [1] and r.epoch == 7
    with pytest.raises(InvalidArgument, match="has no epoch"):  # a forged free, say
        r.step(dataclasses.replace(prefill(5, epoch=0), free=(1,)), None)
    assert sorted(r.cache.block_tables) == [1]


def test_an_epoch_far_ahead_of_the_clock_is_refused_and_drops_nothing(model_dir):
    r = StageRunner(model_dir, StageSpec.whole(2), num_kv_blocks=32, block_size=4)
    now = time.time_ns() // 1000
    r.step(prefill(0, epoch=now), None)
    with pytest.raises(InvalidArgument, match="ahead of this stage's clock"):
        r.step(prefill(1, epoch=2**64 - 1), None)
    assert sorted(r.cache.block_tables) == [0] and r.epoch == now
