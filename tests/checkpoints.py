"""Tiny random Hugging Face checkpoints built by ``transformers``, and the parity check.

Used by the parity tests: ``make_hf_checkpoint`` writes a model of each supported family
that exercises its special features (GQA, qkv bias, tied embeddings, sliding window, MoE
with or without a shared expert), ``hf_model`` loads it back as the reference, and
``teacher_forcing_check`` judges a sequence we generated against the reference logits.

Import it as ``from tests.checkpoints import ...`` (``tests`` is a package and pytest puts
the repository root on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stagemesh.cli.demo import BOS_ID, EOS_ID, write_tokenizer
from stagemesh.model import families

FAMILIES = tuple(families.FAMILIES)

_COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def make_hf_checkpoint(
    family: str, out_dir: str | Path, *, num_layers: int = 3, shards: int = 1, seed: int = 0, **overrides
) -> Path:
    """Builds a tiny random ``family`` model with transformers and saves it into ``out_dir``.

    The family's ``test_features`` set what it must exercise; ``overrides`` win over them.
    Float32; every weight redrawn from ``torch.manual_seed(seed)`` with std 1/sqrt(fan_in),
    norm weights 1 + N(0, 0.1) and biases N(0, 0.1), so no zero or one init hides a bug.
    Qwen2-MoE layer 1 is dense (``mlp_only_layers=[1]``) unless overridden. ``shards > 1``
    saves with a ``max_shard_size`` that yields at least ``shards`` files and an index.
    Also writes ``tokenizer.json`` with exactly the model's ``vocab_size`` ids.
    """
    import transformers

    fam = families.named(family)
    kwargs = {**_COMMON, **fam.test_features, "num_hidden_layers": num_layers, **overrides}
    config = getattr(transformers, fam.hf_config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model)
    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size=_shard_bytes(model, shards))
    write_tokenizer(out, vocab_size=config.vocab_size, model_max_length=config.max_position_embeddings)
    return out


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
            else:  # [..., out, in] (fused experts included): keep activations O(1)
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def _shard_bytes(model: torch.nn.Module, shards: int) -> int | str:
    if shards <= 1:
        return "10GB"
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total // shards


def hf_model(model_dir: str | Path):
    """The checkpoint loaded by transformers: float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def teacher_forcing_check(
    hf_model, prompt_ids: list[int], generated_ids: list[int], tol: float = 1e-4, *, request: str = "request"
) -> None:
    """Asserts each generated token is the reference's greedy choice given our own prefix.

    One forward over ``prompt + generated[:-1]``; the token generated at step ``j`` must be
    the argmax of the logits at position ``len(prompt) - 1 + j``, or within ``tol`` of the
    max logit (a near-tie that float noise may break either way).
    """
    if not generated_ids:
        return
    ids = list(prompt_ids) + list(generated_ids[:-1])
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()  # [T, V]
    vocab = logits.shape[-1]
    for j, ours in enumerate(generated_ids):
        pos = len(prompt_ids) - 1 + j
        row = logits[pos]
        if not 0 <= ours < vocab:
            raise AssertionError(f"{request}: position {pos}: our token {ours} is outside the vocab [0, {vocab})")
        theirs = int(row.argmax())
        if ours != theirs and float(row[theirs] - row[ours]) > tol:
            raise AssertionError(
                f"{request}: position {pos} (generated token {j}): our token {ours} "
                f"(logit {float(row[ours]):.6f}) != HF argmax {theirs} (logit {float(row[theirs]):.6f})"
            )
