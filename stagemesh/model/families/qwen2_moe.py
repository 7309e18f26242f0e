"""Qwen2-MoE: Qwen2's attention; sparse layers chosen by ``decoder_sparse_step`` and
``mlp_only_layers``, each with a shared expert behind a sigmoid gate beside the routed ones."""

from __future__ import annotations

from dataclasses import replace

from stagemesh.model.families.base import DemoShape, MoeMapping, router_keys
from stagemesh.model.families.llama import QWEN2, qwen2_attention_keys


def sparse_layers(raw: dict, num_layers: int) -> tuple[int, ...]:
    """Every ``decoder_sparse_step``-th layer (counting from 1) not listed in ``mlp_only_layers``."""
    step = raw.get("decoder_sparse_step", 1) or 1
    dense = set(raw.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _demo_keys(shape: DemoShape) -> dict:
    return qwen2_attention_keys(shape) | router_keys(shape) | dict(
        decoder_sparse_step=1,
        mlp_only_layers=sorted(shape.mlp_only_layers),
        moe_intermediate_size=shape.moe_intermediate_size,
        norm_topk_prob=shape.norm_topk_prob,
        num_experts=shape.num_experts,
        qkv_bias=True,
        shared_expert_intermediate_size=shape.shared_expert_intermediate_size,
        sliding_window=0,
    )


QWEN2_MOE = replace(
    QWEN2,
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    hf_config_class="Qwen2MoeConfig",
    demo_keys=_demo_keys,
    config=replace(QWEN2.config, qkv_bias_key="qkv_bias"),
    moe=MoeMapping(
        num_experts_key="num_experts",
        expert_width_key="moe_intermediate_size",
        layers=sparse_layers,
        norm_topk_prob_key="norm_topk_prob",
        shared_expert_width_key="shared_expert_intermediate_size",
    ),
    test_features=dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],  # a dense layer between sparse ones
    ),
)

FAMILIES = (QWEN2_MOE,)
