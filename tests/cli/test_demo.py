"""The demo checkpoint is exactly what transformers would write for the same config."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from stagemesh.cli.demo import BOS_ID, EOS_ID, FAMILIES, add_arguments, run, write_demo_model
from stagemesh.config import ModelConfig
from stagemesh.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=32,
    num_layers=3,
    intermediate_size=48,
    vocab_size=300,
    num_experts=4,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)


def read_tensors(model_dir) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, file) over every safetensors file of a checkpoint."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: (tuple(f.get_slice(k).get_shape()), path.name) for k in f.keys()})
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def demo(request, tmp_path_factory):
    family = request.param
    extra = dict(mlp_only_layers=(1,)) if family == "qwen2_moe" else {}
    path = write_demo_model(tmp_path_factory.mktemp(family), family=family, seed=1, **TINY, **extra)
    return family, path


def test_demo_matches_a_model_saved_by_transformers(demo, tmp_path):
    family, path = demo
    config = transformers.AutoConfig.from_pretrained(path)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    ours = {k: shape for k, (shape, _) in read_tensors(path).items()}
    theirs = {k: shape for k, (shape, _) in read_tensors(tmp_path).items()}
    assert ours == theirs
    ref_config = json.loads((tmp_path / "config.json").read_text())
    assert json.loads((path / "config.json").read_text()).keys() == ref_config.keys()


def test_demo_loads_with_transformers_without_missing_keys(demo):
    family, path = demo
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert torch.equal(model.model.embed_tokens.weight, f.get_tensor("model.embed_tokens.weight"))
    assert transformers.AutoTokenizer.from_pretrained(path)("hi").input_ids[0] == BOS_ID


def test_demo_config_reads_with_model_config(demo):
    family, path = demo
    cfg = ModelConfig.from_dir(path)
    assert (cfg.family, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (family, 32, 3, 300)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.head_dim) == (BOS_ID, (EOS_ID,), 8)
    assert cfg.qkv_bias == (family in ("qwen2", "qwen2_moe"))
    expected_moe = {"mixtral": (0, 1, 2), "qwen2_moe": (0, 2)}.get(family, ())
    assert cfg.moe_layers == expected_moe
    assert Tokenizer.from_dir(path).vocab_size == cfg.vocab_size
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (BOS_ID, EOS_ID)


def test_demo_weights_follow_the_init_rule(demo):
    family, path = demo
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name.endswith("norm.weight"):
                assert torch.equal(t, torch.ones_like(t)), name
            elif name.endswith(".bias"):
                assert torch.equal(t, torch.zeros_like(t)), name
            else:
                assert 0.01 < t.std() < 0.03 and t.dtype == torch.float32, name


def test_sharded_demo_has_a_consistent_index(tmp_path):
    path = write_demo_model(tmp_path, family="qwen2_moe", shards=3, **TINY)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    stored = read_tensors(path)
    assert index["weight_map"] == {k: file for k, (_, file) in stored.items()}
    sizes = {k: torch.Size(shape).numel() * 4 for k, (shape, _) in stored.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ModelConfig.from_dir(path).moe_layers == (0, 1, 2)


def test_seed_decides_the_weights(tmp_path):
    a = write_demo_model(tmp_path / "a", family="llama", seed=3, **TINY)
    b = write_demo_model(tmp_path / "b", family="llama", seed=3, **TINY)
    c = write_demo_model(tmp_path / "c", family="llama", seed=4, **TINY)
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] != data[2]


def test_unknown_family_and_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        write_demo_model(tmp_path, family="gpt2")
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        write_demo_model(tmp_path, family="llama", num_kv_heads=3)


def test_cli_pair_writes_the_model(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--family", "mixtral", "--seed", "2", "--num-layers", "2", "--hidden-size", "32"])
    assert run(args) == 0
    assert str(tmp_path) in capsys.readouterr().out
    assert ModelConfig.from_dir(tmp_path).num_hidden_layers == 2


def test_cli_shape_flags_reach_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--family", "llama", "--hidden-size", "40", "--intermediate-size", "72", "--num-heads", "10",
             "--num-kv-heads", "5", "--vocab-size", "300", "--dtype", "bfloat16"]
    assert run(parser.parse_args([str(tmp_path), *flags])) == 0
    cfg = ModelConfig.from_dir(tmp_path)
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (72, 10, 5)
    assert (cfg.vocab_size, cfg.dtype) == (300, "bfloat16")


def test_demo_needs_no_transformers_and_imports_no_torch_until_writing(tmp_path):
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import stagemesh.cli.demo as d\n"
        "assert 'torch' not in sys.modules\n"
        f"d.write_demo_model({str(tmp_path)!r}, family='llama', hidden_size=32, num_layers=1, vocab_size=300)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "model.safetensors").is_file()


def test_cli_refuses_a_directory_that_is_not_empty_without_force(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    small = ["--family", "llama", "--num-layers", "1", "--hidden-size", "32", "--vocab-size", "300"]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty .*notes.txt.*--force"):
        run(parser.parse_args([str(tmp_path), *small]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert run(parser.parse_args([str(tmp_path), *small, "--shards", "2", "--force"])) == 0
    assert run(parser.parse_args([str(tmp_path), *small, "--force"])) == 0  # the two shards of before go
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert ModelConfig.from_dir(tmp_path).num_hidden_layers == 1
