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

from stagemesh.config import ModelConfig
from stagemesh.model import families
from stagemesh.model.families import DemoShape
from stagemesh.model.families.qwen2_moe import QWEN2_MOE

FAMILIES = tuple(families.FAMILIES)
DEFAULT_FAMILY = QWEN2_MOE.name
"""The demo's default: sparse layers, a dense one and a shared expert show the most."""
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1
TRANSFORMERS_VERSION = "5.23.0"

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


def hf_config(family: str, **shape) -> dict:
    """The ``config.json`` transformers 5.23 writes for ``family`` with ``shape`` (the fields of
    :class:`~stagemesh.model.families.DemoShape`: ``hidden_size=128``, ``num_layers=4``, ...)."""
    fam, s = families.named(family), DemoShape(**shape)
    cfg = {
        "architectures": [fam.architectures[0]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "dtype": s.dtype,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings,
        "model_type": fam.name,
        "num_attention_heads": s.num_heads,
        "num_hidden_layers": s.num_layers,
        "num_key_value_heads": s.num_kv_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": float(s.rope_theta), "rope_type": "default"},
        "tie_word_embeddings": s.tie_word_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": s.vocab_size,
    }
    return dict(sorted((cfg | fam.demo_keys(s)).items()))


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint with config ``cfg``, named by its family's table, in model
    order (embedding, layers, final norm, ``lm_head``)."""
    config = ModelConfig.from_dict(cfg)
    names, hidden, vocab = config.tensors, config.hidden_size, config.vocab_size
    shapes = {f"{names.embed}.weight": (vocab, hidden)}
    for i in range(config.num_hidden_layers):
        shapes.update(_attention_shapes(config, i))
        shapes.update(_mlp_shapes(config, i))
        shapes[f"{names.input_norm.format(layer=i)}.weight"] = (hidden,)
        shapes[f"{names.post_norm.format(layer=i)}.weight"] = (hidden,)
    shapes[f"{names.final_norm}.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes[f"{names.lm_head}.weight"] = (vocab, hidden)
    return shapes


def _attention_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    prefix, (q, k, v, o) = config.tensors.attention.format(layer=layer), config.tensors.attention_proj
    hidden, bias = config.hidden_size, config.qkv_bias
    shapes = {}
    for name, out in ((q, config.q_size), (k, config.kv_size), (v, config.kv_size)):
        shapes.update(_linear(f"{prefix}.{name}", out, hidden, bias))
    return shapes | _linear(f"{prefix}.{o}", hidden, config.q_size, config.o_bias)


def _mlp_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    names, hidden = config.tensors, config.hidden_size
    if not config.is_moe_layer(layer):
        return _swiglu(names.mlp.format(layer=layer), names.mlp_proj, hidden, config.intermediate_size, config.mlp_bias)
    shapes = _linear(names.router.format(layer=layer), config.num_experts, hidden)
    for e in range(config.num_experts):
        expert = names.expert.format(layer=layer, expert=e)
        shapes.update(_swiglu(expert, names.expert_proj, hidden, config.moe_intermediate_size))
    if config.shared_expert_intermediate_size:
        shared = names.shared_expert.format(layer=layer)
        shapes.update(_swiglu(shared, names.mlp_proj, hidden, config.shared_expert_intermediate_size))
        shapes.update(_linear(names.shared_expert_gate.format(layer=layer), 1, hidden))
    return shapes


def _swiglu(prefix: str, proj: tuple[str, str, str], hidden: int, width: int, bias: bool = False) -> dict:
    gate, up, down = proj
    shapes = _linear(f"{prefix}.{gate}", width, hidden, bias) | _linear(f"{prefix}.{up}", width, hidden, bias)
    return shapes | _linear(f"{prefix}.{down}", hidden, width, bias)


def _linear(prefix: str, out: int, inp: int, bias: bool = False) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.weight": (out, inp)}
    if bias:
        shapes[f"{prefix}.bias"] = (out,)
    return shapes


def write_demo_model(
    out_dir: str | Path, *, family: str = DEFAULT_FAMILY, seed: int = 0, shards: int = 1, **shape
) -> Path:
    """Writes a random ``family`` checkpoint into ``out_dir`` and returns its path.

    ``shape`` takes the fields of :class:`~stagemesh.model.families.DemoShape` (``hidden_size=128``,
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
    parser.add_argument("dir", type=Path, help="directory to write the checkpoint into (new or empty, unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="write into a directory that is not empty, replacing its checkpoint files")
    parser.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY, help="model family (architecture)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    parser.add_argument("--num-layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden-size", type=int, default=128, help="width of the residual stream")
    parser.add_argument("--intermediate-size", type=int, default=256, help="width of the dense MLP")
    parser.add_argument("--num-heads", type=int, default=4, help="attention (query) heads")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="embedding rows; the tokenizer gets exactly this many ids")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the stored weights")


def run(args: argparse.Namespace) -> int:
    """Runs ``stagemesh demo-model``; prints the directory written (the command's output)."""
    _check_target(args.dir, args.force)
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


def _check_target(out: Path, force: bool) -> None:
    """ValueError unless ``out`` is new or empty, or ``force``; with ``force``, the weight files of an
    earlier checkpoint there go first (a different shard count would leave stale ones the loader reads)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: demo-model writes a checkpoint directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"{out} is not empty ({shown}): demo-model writes into a new or empty directory; "
                         "give --force to write into it anyway, replacing its checkpoint files")
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"] if entries else []:
        stale.unlink(missing_ok=True)
