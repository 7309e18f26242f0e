"""Mixtral: Llama's attention (with Mistral's window key, unset: full attention), every layer a sparse MoE block under ``block_sparse_moe``
whose experts name their projections ``w1`` (gate), ``w3`` (up) and ``w2`` (down)."""

from __future__ import annotations

from dataclasses import replace

from stagemesh.model.families.base import DemoShape, MoeMapping, TensorNames, every_layer, router_keys
from stagemesh.model.families.llama import LLAMA


def _demo_keys(shape: DemoShape) -> dict:
    return router_keys(shape) | dict(
        head_dim=shape.head_dim,
        intermediate_size=shape.moe_intermediate_size,
        num_local_experts=shape.num_experts,
        router_jitter_noise=0.0,
        sliding_window=shape.sliding_window,
    )


MIXTRAL = replace(
    LLAMA,
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    hf_config_class="MixtralConfig",
    demo_keys=_demo_keys,
    tensors=TensorNames(
        router="model.layers.{layer}.block_sparse_moe.gate",
        expert="model.layers.{layer}.block_sparse_moe.experts.{expert}",
        expert_proj=("w1", "w3", "w2"),
    ),
    moe=MoeMapping(num_experts_key="num_local_experts", expert_width_key="intermediate_size", layers=every_layer),
    test_features=dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=None),
)
"""Its routing weights are always renormalised (no ``norm_topk_prob`` key)."""

FAMILIES = (MIXTRAL,)
