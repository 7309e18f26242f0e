"""ModelConfig.from_dir on real transformers checkpoints, and the checkpoint helpers themselves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from stagemesh.config import ModelConfig
from stagemesh.model.families import ARCHITECTURES

pytest.importorskip("transformers")
from tests.checkpoints import FAMILIES, hf_model, make_hf_checkpoint, teacher_forcing_check  # noqa: E402

# Per family: the fields its tiny checkpoint must report (see tests/checkpoints.py).
EXPECTED = {
    "llama": dict(qkv_bias=False, tie_word_embeddings=False, sliding_window=None, rope_theta=1e4, moe_layers=()),
    "qwen2": dict(qkv_bias=True, tie_word_embeddings=True, sliding_window=None, rope_theta=1e6, moe_layers=()),
    "mistral": dict(qkv_bias=False, tie_word_embeddings=False, sliding_window=8, rope_theta=5e5, moe_layers=()),
    "mixtral": dict(
        qkv_bias=False, sliding_window=None, rope_theta=1e6, moe_layers=(0, 1, 2),
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        qkv_bias=True, sliding_window=None, moe_layers=(0, 2), num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=96, intermediate_size=128, norm_topk_prob=False,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_hf_checkpoint(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_from_dir_reads_each_family(checkpoints, family):
    cfg = ModelConfig.from_dir(checkpoints[family])
    assert cfg.family == family and ARCHITECTURES[cfg.architecture].name == family
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 3, 320)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.dtype) == (0, (1,), "float32")
    assert cfg.is_moe == bool(cfg.moe_layers)
    for field, value in EXPECTED[family].items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("family", FAMILIES)
def test_head_dim_and_bias_agree_with_the_stored_tensors(checkpoints, family):
    cfg = ModelConfig.from_dir(checkpoints[family])
    with safe_open(str(checkpoints[family] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == (cfg.kv_size, 64)
    assert ("model.layers.0.self_attn.q_proj.bias" in keys) == cfg.qkv_bias
    assert ("lm_head.weight" in keys) != cfg.tie_word_embeddings


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_moe_norm_topk_prob_is_read(tmp_path, norm_topk_prob):
    path = make_hf_checkpoint("qwen2_moe", tmp_path, num_layers=2, norm_topk_prob=norm_topk_prob)
    assert ModelConfig.from_dir(path).norm_topk_prob is norm_topk_prob


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        ModelConfig.from_dir(tmp_path)
    assert all(name in str(err.value) for name in ARCHITECTURES)


def test_missing_or_broken_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


# --- the checkpoint helpers (tests/checkpoints.py) used by the parity tests ---


def test_sharded_checkpoint_has_several_files_and_an_index(tmp_path):
    path = make_hf_checkpoint("llama", tmp_path, shards=3)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(files) >= 3 and set(index["weight_map"].values()) == set(files)
    assert ModelConfig.from_dir(path).num_hidden_layers == 3


def test_no_zero_or_one_init_is_left(checkpoints):
    with safe_open(str(checkpoints["qwen2_moe"] / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            assert not torch.all(t == 0) and not torch.all(t == 1), name


def test_mistral_window_is_exercised_by_a_longer_prompt(checkpoints, tmp_path):
    ids = torch.tensor([list(range(2, 22))])  # 20 tokens > sliding_window 8
    windowed = hf_model(checkpoints["mistral"])
    full = hf_model(make_hf_checkpoint("mistral", tmp_path, sliding_window=None))
    with torch.no_grad():
        a, b = windowed(ids).logits, full(ids).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


def greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_teacher_forcing_check_accepts_greedy_and_names_a_mismatch(checkpoints):
    model = hf_model(checkpoints["llama"])
    prompt = [0, 5, 6, 7]
    generated = greedy(model, prompt, 4)
    teacher_forcing_check(model, prompt, generated)
    wrong = generated[:2] + [(generated[2] + 1) % 320] + generated[3:]
    with pytest.raises(AssertionError, match=r"req-9: position 5 .*our token .* \(logit .*HF argmax .* \(logit"):
        teacher_forcing_check(model, prompt, wrong, request="req-9")
    with torch.no_grad():
        row = model(torch.tensor([prompt])).logits[0, -1]
    gap = float(row.max() - row[(generated[0] + 1) % 320])
    teacher_forcing_check(model, prompt, [(generated[0] + 1) % 320], tol=gap + 1e-6)  # a near-tie within tol
