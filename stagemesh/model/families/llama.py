"""Llama, and the families that are Llama with a different switch: Mistral (a sliding window)
and Qwen2 (q/k/v biases, no window)."""

from __future__ import annotations

from dataclasses import replace

from stagemesh.model.families.base import ConfigMapping, DemoShape, Family


def _rope(theta: float) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


LLAMA = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    hf_config_class="LlamaConfig",
    demo_keys=lambda s: dict(attention_bias=False, head_dim=s.head_dim, mlp_bias=False, pretraining_tp=1),
    test_features=_rope(10000.0),
)

MISTRAL = replace(
    LLAMA,
    name="mistral",
    architectures=("MistralForCausalLM",),
    hf_config_class="MistralConfig",
    demo_keys=lambda s: dict(head_dim=s.head_dim, sliding_window=s.sliding_window),
    config=ConfigMapping(sliding_window_default=4096),
    test_features=dict(sliding_window=8, **_rope(500000.0)),
)

QWEN2_CONFIG = ConfigMapping(
    qkv_bias_key=None,
    qkv_bias_default=True,
    o_bias_key=None,
    sliding_window_key=None,
    # NOTE: Qwen2 windows only the layers from max_window_layers on; one mask per step can't.
    refused=(("use_sliding_window", "Qwen2 checkpoints with use_sliding_window=true are not supported yet"),),
)
"""Qwen2's attention: q/k/v biased, o_proj not; full attention (the per-layer window is refused)."""


def qwen2_attention_keys(shape: DemoShape) -> dict:
    """The attention keys transformers writes for the Qwen2 families."""
    return {
        "layer_types": ["full_attention"] * shape.num_layers,
        "max_window_layers": shape.num_layers,
        "use_sliding_window": False,
    }


QWEN2 = replace(
    LLAMA,
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    hf_config_class="Qwen2Config",
    demo_keys=lambda s: qwen2_attention_keys(s) | dict(sliding_window=None),
    config=QWEN2_CONFIG,
    test_features=dict(tie_word_embeddings=True, **_rope(1000000.0)),
)

FAMILIES = (LLAMA, MISTRAL, QWEN2)
