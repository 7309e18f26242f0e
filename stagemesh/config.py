"""Frozen, typed configuration: the model's shapes (from ``config.json``) and a stage's span.

Torch-free: the gateway and the planner read these too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stagemesh.model.families import TensorNames, for_config, named


@dataclass(frozen=True)
class ModelConfig:
    """The shapes and switches of one decoder-only checkpoint."""

    architecture: str
    """Hugging Face class name, e.g. ``LlamaForCausalLM``."""
    family: str
    """The name of its family in ``stagemesh.model.families``, e.g. ``llama``."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the dense MLP (layers that are not MoE)."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    """The model's context: a prompt plus its new tokens never exceed it."""
    rope_scaling: dict | None = None
    """``rope_type`` and its parameters when not the default rotary embedding."""
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """Bias on q/k/v projections (Qwen2 families, Llama's ``attention_bias``)."""
    o_bias: bool = False
    """Bias on the output projection (Llama's ``attention_bias``)."""
    mlp_bias: bool = False
    sliding_window: int | None = None
    """Keys further back than this many positions are masked (Mistral); None for full attention."""
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "float32"
    """The checkpoint's stored dtype."""
    # --- Mixture-of-Experts (num_experts == 0 for dense models) ---
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    """Width of one routed expert's MLP."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to one (always true for Mixtral)."""
    shared_expert_intermediate_size: int = 0
    """Width of the Qwen2-MoE shared expert; 0 when there is none."""
    moe_layers: tuple[int, ...] = field(default_factory=tuple)
    """Global indices of the layers whose MLP is a sparse MoE block."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def tensors(self) -> TensorNames:
        """Where its family keeps each tensor in the checkpoint."""
        return named(self.family).tensors

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} has no config.json: point --model at a Hugging Face checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file() and raw.get("eos_token_id") is None:
            # NOTE: checkpoints often name their EOS only in generation_config.json.
            raw = {**raw, "eos_token_id": json.loads(gen.read_text()).get("eos_token_id")}
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        arch, family = for_config(raw)
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        rope_scaling = None if rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        cfg = cls(
            architecture=arch,
            family=family.name,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw.get("intermediate_size", 0),
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            **family.config_fields(raw),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; stagemesh implements 'silu'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in ("linear", "llama3"):
            raise ValueError(f"rope scaling {self.rope_scaling!r} is not supported; use default, linear or llama3")


def layer_range(start: float, end: float) -> str:
    """The one notation of a stage's layers wherever people read them (logs, errors, `stagemesh
    status`, the dashboard's ``layerRange``): half-open bounds, e.g. ``[0, 12)`` for layers 0..11
    and ``[0, 3.5)`` for layers 0..2 plus layer 3's attention (``layer_bounds``)."""
    return f"[{start:g}, {end:g})"


def layer_bounds(start: int, end: int, mlp_only_start: bool, attn_only_end: bool) -> tuple[int | float, int | float]:
    """A stage's whole-layer range and half-layer flags as bounds in layers (``x.5`` between
    layer x's attention and its MLP), as ``StageSpec.bounds`` and the status document give them."""
    return (start + 0.5 if mlp_only_start else start), (end - 0.5 if attn_only_end else end)


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: global decoder layers ``[start_layer, end_layer)`` of ``num_layers``.

    A boundary between two stages may also cut a layer between its attention and its MLP,
    which balances the stages more finely: the stage before then ends with that layer's
    attention (``attn_only_end``), the stage after starts with its MLP (``mlp_only_start``),
    and what passes between them is the residual stream after the attention.
    """

    start_layer: int
    end_layer: int
    num_layers: int
    """Layers in the whole model, so a stage knows whether it is the first or the last."""
    mlp_only_start: bool = False
    """The first layer runs only its MLP: the stage before ran its attention."""
    attn_only_end: bool = False
    """The last layer runs only its attention: the stage after runs its MLP."""

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer <= self.num_layers:
            raise ValueError(
                f"stage layers [{self.start_layer}, {self.end_layer}) must be a non-empty range "
                f"inside [0, {self.num_layers})"
            )
        if not self.attention_layers:
            raise ValueError(f"stage layers {self.label} hold no attention: a stage needs a KV cache")

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0 and not self.mlp_only_start

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.num_layers and not self.attn_only_end

    @property
    def layers(self) -> range:
        """Every layer it runs a part of."""
        return range(self.start_layer, self.end_layer)

    @property
    def attention_layers(self) -> range:
        """The layers whose attention (and KV cache) it holds."""
        return range(self.start_layer + self.mlp_only_start, self.end_layer)

    @property
    def mlp_layers(self) -> range:
        """The layers whose MLP it holds."""
        return range(self.start_layer, self.end_layer - self.attn_only_end)

    @property
    def bounds(self) -> tuple[int | float, int | float]:
        """Where it starts and ends in layers: ``x.5`` is between layer x's attention and its MLP."""
        return layer_bounds(self.start_layer, self.end_layer, self.mlp_only_start, self.attn_only_end)

    @property
    def label(self) -> str:
        """For logs and messages, e.g. ``[0, 3.5)`` (``layer_range``)."""
        return layer_range(*self.bounds)

    @classmethod
    def whole(cls, num_layers: int) -> "StageSpec":
        return cls(0, num_layers, num_layers)
