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
