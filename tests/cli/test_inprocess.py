"""The in-process engine's options reach its stage runners."""

from __future__ import annotations

import torch

from stagemesh.cli.inprocess import InProcessEngine
from tests.checkpoints import make_hf_checkpoint


def test_every_stage_loads_on_the_device_the_engine_is_given(tmp_path):
    # NOTE: the meta device stands in for cuda here: it takes the same path (weights, KV cache
    # and rotary tables created on the device) on a machine without a GPU, and holds no data.
    model = make_hf_checkpoint("llama", tmp_path / "llama", num_layers=2)
    engine = InProcessEngine(model, pp=2, device="meta", num_kv_blocks=8)
    meta = torch.device("meta")
    assert [r.device for r in engine.chain.runners] == [meta, meta]
    assert {p.device for r in engine.chain.runners for p in r.model.parameters()} == {meta}
    assert {r.cache.kv.device for r in engine.chain.runners} == {meta}


def test_a_second_run_meets_no_kv_cache_the_first_left_behind(tmp_path):
    # each run has an engine of its own whose sequence ids start at 0 again, over the same stages
    # (bench warms up with a short run, then runs the load): CI saw the second run refused, its
    # sequence 0 meeting the first run's unfreed cache
    import asyncio

    from stagemesh.cli.requests_io import InputLine
    from stagemesh.serving.params import SamplingParams

    model = make_hf_checkpoint("llama", tmp_path / "llama", num_layers=2)
    engine = InProcessEngine(model, pp=2, num_kv_blocks=64)
    lines = [InputLine(None, (3 + i, 4, 5, 6), SamplingParams(max_new_tokens=2, ignore_eos=True))
             for i in range(4)]
    first = asyncio.run(engine.run(lines))
    assert all(o.error is None and len(o.token_ids) == 2 for o in first)
    assert [r.cache.blocks_used for r in engine.chain.runners] == [0, 0]
    again = asyncio.run(engine.run(lines))
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
