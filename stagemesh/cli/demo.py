"""A small random checkpoint in the exact Hugging Face layout, for trying stagemesh out.

``stagemesh demo-model DIR [--family F] [--seed S]`` writes ``config.json`` (the keys
``transformers`` 5.23 writes for that class), ``model.safetensors`` (or shards and their
index), ``generation_config.json``, and a byte-level BPE ``tokenizer.json`` trained here on
a few embedded paragraphs. ``transformers`` is not needed; torch is imported only when the
weights are written, so the CLI that registers this command starts fast.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

FAMILIES = ("qwen2_moe", "llama", "mistral", "qwen2", "mixtral")
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1
TRANSFORMERS_VERSION = "5.23.0"

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}

CORPUS = (
    "The river begins as a thin thread of water high in the mountains, where snow melts "
    "under the spring sun. It gathers strength from a hundred small streams, cuts through "
    "granite and clay, and by the time it reaches the valley it is wide enough to carry "
    "boats loaded with grain, timber, wool and salt toward the harbour towns on the coast.",
    "In the old market square, merchants open their stalls before dawn. Bakers stack warm "
    "loaves beside baskets of apples, pears, plums and figs; a fishmonger shouts the price "
    "of herring and mackerel; children chase pigeons between the fountains while their "
    "grandparents argue quietly about the weather, the harvest and yesterday's football match.",
    "A computer program is a precise description of a process. The machine follows every "
    "instruction exactly, which is both its strength and its weakness: it never grows tired "
    "or bored, yet it cannot guess what the programmer meant when the code says something "
    "else. Good engineers therefore write small functions, name things clearly, measure "
    "before they optimise, and test the behaviour they depend on.",
    "Language models read text as a sequence of tokens. Each token is a word, a piece of a "
    "word, or a single byte, and the model learns which token is likely to come next. To "
    "serve a large model quickly, its layers can be split across several graphics cards: "
    "one stage computes the first layers, streams its activations to the next stage, and so "
    "on, while a gateway schedules many requests in small batches to keep every stage busy.",
    "Winter arrived early that year. The lake froze in a single night, the roads turned to "
    "glass, and the village school closed for a week. Farmers fed their cattle with hay "
    "stored in tall barns, and in the evenings families gathered around the stove to tell "
    "stories about wolves, lost travellers, brave sailors and generous strangers.",
    "Mathematics offers a language for patterns. Numbers measure quantity, geometry "
    "describes shape and space, algebra captures relationships between unknown values, and "
    "probability helps us reason about uncertainty. A proof is a chain of careful steps in "
    "which every link must hold; when it does, the conclusion is true forever.",
    "The library was quiet except for the soft turning of pages. Students bent over thick "
    "volumes of history, chemistry, philosophy and law; a librarian pushed a squeaking "
    "trolley along the shelves, returning novels, atlases, dictionaries and journals to "
    "their proper places, and outside the tall windows it had started to rain.",
    "Good bread needs only flour, water, salt and yeast, but also patience. Mix the dough, "
    "knead it until it is smooth and elastic, let it rise slowly in a warm kitchen, shape "
    "the loaf gently, and bake it in a very hot oven until the crust is golden brown and "
    "sounds hollow when you tap the bottom. Café owners in Zürich, São Paulo and Kraków "
    "agree: fresh bread at 7:30 costs €2, 42% less than cake!",
)


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # NOTE: the corpus may run out of merges before vocab_size; reserved special tokens fill
    # the rest (as Llama 3 does) so the vocabulary matches the model's embedding rows exactly.
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    return tok.to_str()


def write_tokenizer(out_dir: str | Path, *, vocab_size: int = 1024, model_max_length: int = 2048) -> None:
    """Writes ``tokenizer.json`` (byte-level BPE of exactly ``vocab_size`` ids, ``<s>`` = 0,
    ``</s>`` = 1, BOS prepended) and ``tokenizer_config.json`` into ``out_dir``."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must be at least 258 (256 bytes + <s> + </s>)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_tokenizer_json(vocab_size))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "backend": "tokenizers",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "tokenizer_class": "TokenizersBackend",
    }
    _write_json(out / "tokenizer_config.json", config)


def hf_config(
    family: str,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    num_experts: int = 8,
    top_k: int = 2,
    moe_intermediate_size: int = 96,
    shared_expert_intermediate_size: int = 192,
    norm_topk_prob: bool = False,
    mlp_only_layers: tuple[int, ...] = (),
    sliding_window: int | None = None,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
) -> dict:
    """The ``config.json`` transformers 5.23 writes for ``family`` with these shapes.

    Mixtral's experts are ``moe_intermediate_size`` wide (its ``intermediate_size`` key);
    ``sliding_window`` applies to Mistral and Mixtral (None: full attention).
    """
    if family not in _ARCHITECTURES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}, "
            f"and num_heads a multiple of num_kv_heads={num_kv_heads}"
        )
    head_dim = hidden_size // num_heads
    cfg = {
        "architectures": [_ARCHITECTURES[family]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "dtype": dtype,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": family,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": float(rope_theta), "rope_type": "default"},
        "tie_word_embeddings": tie_word_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    qwen_attention = {
        "layer_types": ["full_attention"] * num_layers,
        "max_window_layers": num_layers,
        "use_sliding_window": False,
    }
    router = {"num_experts_per_tok": top_k, "output_router_logits": False, "router_aux_loss_coef": 0.001}
    if family == "llama":
        cfg.update(attention_bias=False, head_dim=head_dim, mlp_bias=False, pretraining_tp=1)
    elif family == "mistral":
        cfg.update(head_dim=head_dim, sliding_window=sliding_window)
    elif family == "qwen2":
        cfg.update(qwen_attention, sliding_window=None)
    elif family == "mixtral":
        cfg.update(router, head_dim=head_dim, intermediate_size=moe_intermediate_size, num_local_experts=num_experts)
        cfg.update(router_jitter_noise=0.0, sliding_window=sliding_window)
    else:
        cfg.update(qwen_attention | router, decoder_sparse_step=1, mlp_only_layers=sorted(mlp_only_layers))
        cfg.update(moe_intermediate_size=moe_intermediate_size, norm_topk_prob=norm_topk_prob)
        cfg.update(num_experts=num_experts, qkv_bias=True, sliding_window=0)
        cfg.update(shared_expert_intermediate_size=shared_expert_intermediate_size)
    return dict(sorted(cfg.items()))


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint with config ``cfg``, named as on the Hugging Face hub, in
    model order (embedding, layers, final norm, ``lm_head``)."""
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes.update(_attention_shapes(cfg, f"{prefix}.self_attn"))
        shapes.update(_mlp_shapes(cfg, prefix, i))
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _attention_shapes(cfg: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {}
    for name, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        shapes[f"{prefix}.{name}.weight"] = (out, hidden)
        if cfg["model_type"] in ("qwen2", "qwen2_moe"):
            shapes[f"{prefix}.{name}.bias"] = (out,)
    shapes[f"{prefix}.o_proj.weight"] = (hidden, q)
    return shapes


def _mlp_shapes(cfg: dict, prefix: str, layer: int) -> dict[str, tuple[int, ...]]:
    family, hidden = cfg["model_type"], cfg["hidden_size"]
    if family == "mixtral":
        shapes = {f"{prefix}.block_sparse_moe.gate.weight": (cfg["num_local_experts"], hidden)}
        for e in range(cfg["num_local_experts"]):
            shapes.update(_swiglu(f"{prefix}.block_sparse_moe.experts.{e}", hidden, cfg["intermediate_size"], "w1", "w3", "w2"))
        return shapes
    if family == "qwen2_moe" and _is_qwen2_moe_layer(cfg, layer):
        shapes = {f"{prefix}.mlp.gate.weight": (cfg["num_experts"], hidden)}
        for e in range(cfg["num_experts"]):
            shapes.update(_swiglu(f"{prefix}.mlp.experts.{e}", hidden, cfg["moe_intermediate_size"]))
        shapes.update(_swiglu(f"{prefix}.mlp.shared_expert", hidden, cfg["shared_expert_intermediate_size"]))
        shapes[f"{prefix}.mlp.shared_expert_gate.weight"] = (1, hidden)
        return shapes
    return _swiglu(f"{prefix}.mlp", hidden, cfg["intermediate_size"])


def _swiglu(prefix: str, hidden: int, width: int, gate="gate_proj", up="up_proj", down="down_proj") -> dict:
    return {
        f"{prefix}.{gate}.weight": (width, hidden),
        f"{prefix}.{up}.weight": (width, hidden),
        f"{prefix}.{down}.weight": (hidden, width),
    }


def _is_qwen2_moe_layer(cfg: dict, layer: int) -> bool:
    step = cfg.get("decoder_sparse_step") or 1
    return layer not in cfg["mlp_only_layers"] and cfg["num_experts"] > 0 and (layer + 1) % step == 0


def write_demo_model(
    out_dir: str | Path, *, family: str = "qwen2_moe", seed: int = 0, shards: int = 1, **shape
) -> Path:
    """Writes a random ``family`` checkpoint into ``out_dir`` and returns its path.

    ``shape`` takes the keyword arguments of :func:`hf_config` (``hidden_size=128``,
    ``num_layers=4``, ``vocab_size=1024``, ``num_experts=8``, ``top_k=2``, ...). Weights are
    normal(0, 0.02) matrices, ones for norms and zeros for biases, drawn from a
    ``torch.Generator`` seeded with ``seed``; ``shards > 1`` writes
    ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``.
    """
    cfg = hf_config(family, **shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg)
    generation = {"_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    _write_json(out / "generation_config.json", {**generation, "transformers_version": TRANSFORMERS_VERSION})
    write_tokenizer(out, vocab_size=cfg["vocab_size"], model_max_length=cfg["max_position_embeddings"])
    _write_weights(out, _random_tensors(tensor_shapes(cfg), seed, cfg["dtype"]), shards)
    return out


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, dtype: str) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
        tensors[name] = t.to(getattr(torch, dtype))
    return tensors


def _write_weights(out: Path, tensors: dict, shards: int) -> None:
    from safetensors.torch import save_file

    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    groups = _split(list(tensors), [t.nbytes for t in tensors.values()], shards)
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    metadata = {
        "total_parameters": sum(t.numel() for t in tensors.values()),
        "total_size": sum(t.nbytes for t in tensors.values()),
    }
    _write_json(out / "model.safetensors.index.json", {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


def _split(names: list[str], sizes: list[int], n: int) -> list[list[str]]:
    """``names`` in order, cut into exactly ``n`` non-empty runs of about equal bytes."""
    if not 1 <= n <= len(names):
        raise ValueError(f"shards={n} must be between 1 and the number of tensors ({len(names)})")
    target = math.ceil(sum(sizes) / n)
    groups: list[list[str]] = [[]]
    size = 0
    for i, (name, nbytes) in enumerate(zip(names, sizes)):
        must_open = len(names) - i == n - len(groups)
        if groups[-1] and len(groups) < n and (size >= target or must_open):
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stagemesh demo-model``."""
    parser.add_argument("dir", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_moe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=256, help="width of the dense MLP")
    parser.add_argument("--num-heads", type=int, default=4, help="attention (query) heads")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="embedding rows; the tokenizer gets exactly this many ids")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def run(args: argparse.Namespace) -> int:
    """Runs ``stagemesh demo-model``; prints the directory written (the command's output)."""
    out = write_demo_model(
        args.dir,
        family=args.family,
        seed=args.seed,
        shards=args.shards,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
    )
    print(f"wrote a random {args.family} checkpoint to {out}")
    return 0
