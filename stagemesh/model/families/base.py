"""What a model family is: the data that tells one decoder-only checkpoint layout from another.

NOTE: torch-free on purpose. ``stagemesh.config`` (which the gateway imports) reads a
``config.json`` through a family, and the demo writes checkpoints without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class TensorNames:
    """Where a family keeps its tensors, as on the Hugging Face hub.

    Module prefixes (the loader appends ``.weight`` / ``.bias``) written as ``str.format``
    templates over ``{layer}`` (the global layer index) and ``{expert}``.
    """

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    """Absent from checkpoints with tied embeddings: the head then reads ``embed``."""
    input_norm: str = "model.layers.{layer}.input_layernorm"
    post_norm: str = "model.layers.{layer}.post_attention_layernorm"
    attention: str = "model.layers.{layer}.self_attn"
    attention_proj: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Under ``attention``: the query, key, value and output projections."""
    mlp: str = "model.layers.{layer}.mlp"
    """A dense layer's gated MLP."""
    mlp_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """Under ``mlp`` (and ``shared_expert``): the gate, up and down projections."""
    router: str = "model.layers.{layer}.mlp.gate"
    """A sparse layer's router: one logit per routed expert."""
    expert: str = "model.layers.{layer}.mlp.experts.{expert}"
    """One routed expert's gated MLP."""
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """Under ``expert``: the gate, up and down projections."""
    shared_expert: str = "model.layers.{layer}.mlp.shared_expert"
    """The expert every token runs (when the config gives it a width)."""
    shared_expert_gate: str = "model.layers.{layer}.mlp.shared_expert_gate"
    """The sigmoid gate on the shared expert's output."""


@dataclass(frozen=True)
class ConfigMapping:
    """How the family's ``config.json`` spells the attention switches stagemesh reads."""

    qkv_bias_key: str | None = "attention_bias"
    """The key that turns on q/k/v biases; None when the family's value is fixed."""
    qkv_bias_default: bool = False
    """q/k/v biases when the key is absent (or the value when there is no key)."""
    o_bias_key: str | None = "attention_bias"
    """The key that turns on the output projection's bias; None: never biased."""
    sliding_window_key: str | None = "sliding_window"
    """The key of the attention window; None: full attention always."""
    sliding_window_default: int | None = None
    """The window when the key is absent."""
    refused: tuple[tuple[str, str], ...] = ()
    """``(key, why)``: a switch stagemesh does not implement; a true value is refused with ``why``."""


@dataclass(frozen=True)
class MoeMapping:
    """How the family's ``config.json`` describes its sparse layers."""

    num_experts_key: str
    """The key of the number of routed experts per sparse layer."""
    expert_width_key: str
    """The key of one routed expert's intermediate width."""
    layers: Callable[[dict, int], tuple[int, ...]]
    """The MoE-layer rule: ``layers(config_json, num_layers)`` gives the sparse layers' indices."""
    norm_topk_prob_key: str | None = None
    """The key that renormalises the top-k routing weights; None: always renormalised."""
    norm_topk_prob_default: bool = False
    """Renormalisation when the key is absent."""
    shared_expert_width_key: str | None = None
    """The key of the shared expert's width; None: the family has no shared expert."""

    def config_fields(self, raw: dict) -> dict:
        """The ``ModelConfig`` MoE fields read from ``config.json`` ``raw``."""
        n = raw[self.num_experts_key]
        normalize = raw.get(self.norm_topk_prob_key, self.norm_topk_prob_default) if self.norm_topk_prob_key else True
        return dict(
            num_experts=n,
            num_experts_per_tok=raw["num_experts_per_tok"],
            moe_intermediate_size=raw[self.expert_width_key],
            norm_topk_prob=bool(normalize),
            shared_expert_intermediate_size=raw.get(self.shared_expert_width_key, 0) if self.shared_expert_width_key else 0,
            moe_layers=self.layers(raw, raw["num_hidden_layers"]) if n > 0 else (),
        )


def every_layer(raw: dict, num_layers: int) -> tuple[int, ...]:
    """The MoE-layer rule of a family whose every layer is sparse."""
    return tuple(range(num_layers))


@dataclass(frozen=True)
class DemoShape:
    """The shapes of a small random demo checkpoint (``stagemesh demo-model``)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    """Attention (query) heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 256
    """Width of the dense MLP."""
    vocab_size: int = 1024
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 96
    """Width of one routed expert (Mixtral's ``intermediate_size`` key)."""
    shared_expert_intermediate_size: int = 192
    norm_topk_prob: bool = False
    mlp_only_layers: tuple[int, ...] = ()
    """Layers kept dense in a family whose rule allows it."""
    sliding_window: int | None = None
    """Applies to families with a window key; None: full attention."""
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}, "
                f"and num_heads a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def router_keys(shape: DemoShape) -> dict:
    """The router keys transformers writes for a sparse family."""
    return {"num_experts_per_tok": shape.top_k, "output_router_logits": False, "router_aux_loss_coef": 0.001}


@dataclass(frozen=True)
class Family:
    """One model family: its names, how its ``config.json`` and tensors read, which layers are MoE."""

    name: str
    """The ``model_type`` of its ``config.json``, e.g. ``llama``."""
    architectures: tuple[str, ...]
    """Hugging Face class names in ``config.json``'s ``architectures``, e.g. ``LlamaForCausalLM``."""
    hf_config_class: str
    """The ``transformers`` config class, e.g. ``LlamaConfig`` (the test checkpoints build one)."""
    demo_keys: Callable[[DemoShape], dict]
    """The family's own ``config.json`` keys, as transformers writes them, for a demo of ``shape``."""
    config: ConfigMapping = ConfigMapping()
    tensors: TensorNames = TensorNames()
    moe: MoeMapping | None = None
    """None for a dense family."""
    test_features: dict = field(default_factory=dict, compare=False)
    """Config keys a tiny test checkpoint sets to exercise what the family adds (tests/checkpoints.py)."""

    def config_fields(self, raw: dict) -> dict:
        """The ``ModelConfig`` fields this family maps from ``config.json`` ``raw``: biases, window, MoE."""
        c = self.config
        for key, why in c.refused:
            if raw.get(key):
                raise ValueError(why)
        window = raw.get(c.sliding_window_key, c.sliding_window_default) if c.sliding_window_key else None
        fields = dict(
            qkv_bias=bool(raw.get(c.qkv_bias_key, c.qkv_bias_default) if c.qkv_bias_key else c.qkv_bias_default),
            o_bias=bool(raw.get(c.o_bias_key, False)) if c.o_bias_key else False,
            sliding_window=window or None,
        )
        return fields | (self.moe.config_fields(raw) if self.moe else {})
