"""A worker reads only its own tensors: its layer range, its TP slice."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stagemesh.config import StageSpec
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import SampleSpec, SeqChunk, StepPlan
from tests.checkpoints import make_hf_checkpoint


def _all_tensors(model_dir):
    out = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _stage_names(names, spec):
    keep = {"model.norm.weight", "lm_head.weight"} if spec.is_last else set()
    if spec.is_first:
        keep.add("model.embed_tokens.weight")
    return {n for n in names if n in keep or any(n.startswith(f"model.layers.{i}.") for i in spec.layers)}


def test_a_stage_loads_from_a_checkpoint_holding_only_its_tensors(tmp_path):
    full = make_hf_checkpoint("qwen2_moe", tmp_path / "full", num_layers=4, shards=2)
    spec = StageSpec(2, 4, 4)
    tensors = _all_tensors(full)
    mine = _stage_names(tensors, spec)
    assert len(mine) < len(tensors)

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(full / "config.json", partial / "config.json")
    save_file({k: tensors[k].contiguous() for k in mine}, str(partial / "model.safetensors"))

    from_partial = StageRunner(partial, spec, num_kv_blocks=16, block_size=4)
    from_full = StageRunner(full, spec, num_kv_blocks=16, block_size=4)
    assert from_full.reader.names_read == mine  # the full checkpoint: still only our tensors read

    hidden = torch.randn(6, 64)
    plan = StepPlan(0, (SeqChunk(0, 0, tuple(range(6)), SampleSpec(seed=0, index=0)),))
    assert from_partial.step(plan, hidden) == from_full.step(plan, hidden)


def test_missing_tensor_is_a_clear_error(tmp_path):
    full = make_hf_checkpoint("llama", tmp_path / "full", num_layers=2)
    tensors = _all_tensors(full)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(full / "config.json", broken / "config.json")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    try:
        StageRunner(broken, StageSpec.whole(2), num_kv_blocks=4)
    except ValueError as e:
        assert "model.layers.1.mlp.down_proj.weight" in str(e)
    else:
        raise AssertionError("loading a checkpoint without a tensor must fail")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    try:
        StageRunner(tmp_path, StageSpec.whole(1))
    except ValueError as e:
        assert "LlamaForCausalLM" in str(e) and "Qwen2MoeForCausalLM" in str(e)
    else:
        raise AssertionError("an unsupported architecture must fail")


def _half_stage_names(names, spec):
    """The tensors of a stage that may cut its boundary layers between attention and MLP."""
    attention = ("input_layernorm.", "self_attn.")
    mlp = ("post_attention_layernorm.", "mlp.")
    keep = set()
    for i in spec.attention_layers:
        keep |= {n for n in names if n.startswith(tuple(f"model.layers.{i}.{part}" for part in attention))}
    for i in spec.mlp_layers:
        keep |= {n for n in names if n.startswith(tuple(f"model.layers.{i}.{part}" for part in mlp))}
    return keep | {n for n in _stage_names(names, spec) if not n.startswith("model.layers.")}


def test_a_layer_cut_between_attention_and_mlp_runs_as_the_whole_layer_would(tmp_path):
    model = make_hf_checkpoint("llama", tmp_path / "llama", num_layers=3)
    names = set(_all_tensors(model))
    whole = StageRunner(model, StageSpec.whole(3), num_kv_blocks=32, block_size=4)
    first = StageRunner(model, StageSpec(0, 2, 3, attn_only_end=True), num_kv_blocks=32, block_size=4)
    last = StageRunner(model, StageSpec(1, 3, 3, mlp_only_start=True), num_kv_blocks=32, block_size=4)
    for runner in (first, last):
        assert runner.reader.names_read == _half_stage_names(names, runner.spec)
    assert "model.layers.1.self_attn.q_proj.weight" in first.reader.names_read
    assert "model.layers.1.mlp.up_proj.weight" in last.reader.names_read
    assert (first.cache.kv.shape[0], last.cache.kv.shape[0]) == (2, 1)  # layers 0-1 | layer 2 hold KV

    greedy, seeded = SampleSpec(seed=0, index=0), SampleSpec(temperature=1.0, seed=11, index=0)
    prompts = [tuple(range(5, 14)), tuple(range(40, 46))]
    plan = StepPlan(0, (SeqChunk(0, 0, prompts[0], greedy), SeqChunk(1, 0, prompts[1], seeded)))
    for step in range(1, 6):
        expected = whole.step(plan, None)
        assert last.step(plan, first.step(plan, None)) == expected
        plan = StepPlan(step, tuple(
            SeqChunk(c.seq_id, c.start + len(c.token_ids), (expected.tokens[c.seq_id],),
                     SampleSpec(temperature=c.sample.temperature, seed=c.sample.seed, index=step))
            for c in plan.chunks
        ))
