"""Layout planning: whether a model can take a layout, how its layers split into stages, and
where each MoE layer's experts live.

Torch-free: the launcher and the compose renderer plan without loading weights (callers that
plan for CUDA pass the visible GPU count in).
"""

from __future__ import annotations

import math
from functools import lru_cache

from stagemesh.config import ModelConfig, StageSpec


def validate_layout(
    config: ModelConfig, pp: int, tp: int, *, ep: int = 0, dp: int = 1, gpus: int | None = None
) -> None:
    """Refuse a pipeline × tensor-parallel (× expert-parallel) layout the model or the machine cannot take.

    ValueError naming the constraint and the numbers. ``ep``: expert worker processes per
    chain (0: the experts stay in the stages). ``dp``: data-parallel chains, each a complete
    replica. ``gpus``: the visible CUDA device count when the layout runs on CUDA (one GPU
    per rank and per expert worker of every chain, ``dp × (pp × tp + ep)`` of them); None
    checks no GPUs.
    """
    n = config.num_hidden_layers
    if not 1 <= pp <= n:
        raise ValueError(f"pp={pp} must be between 1 and the model's {n} layers")
    if tp < 1:
        raise ValueError(f"tp={tp} must be at least 1")
    if dp < 1:
        raise ValueError(f"dp={dp} must be at least 1 (the number of chains)")
    _check_tp(config, tp)
    if ep:
        _check_ep(config, ep, tp)
    devices = dp * chain_devices(pp, tp, ep)
    if gpus is not None and devices > gpus:
        what = f"pp={pp} x tp={tp}" + (f" + ep={ep}" if ep else "")
        if dp > 1:
            what = f"dp={dp} x ({what})"
        one_per = "one per rank" + (" and expert worker" if ep else "")
        raise ValueError(f"{what} needs {devices} GPUs ({one_per}) but {gpus} are visible")


def chain_devices(pp: int, tp: int, ep: int = 0) -> int:
    """Devices (processes) of one chain: a GPU per TP rank of every stage and per expert worker."""
    return pp * tp + ep


def _check_ep(config: ModelConfig, ep: int, tp: int) -> None:
    if ep < 0:
        raise ValueError(f"ep={ep} must be at least 0 (0 keeps the experts in the stages)")
    _require_moe(config, ep)


def _require_moe(config: ModelConfig, ep: int) -> None:
    if not config.is_moe:
        raise ValueError(
            f"ep={ep} needs a Mixture-of-Experts model, but {config.architecture} is dense; leave --ep out"
        )


def place_experts(config: ModelConfig, ep: int, replicas: int = 1) -> list[dict[int, list[int]]]:
    """Spread every MoE layer's experts over ``ep`` expert workers, each expert on ``replicas`` of them.

    Returns, per worker, global layer -> sorted expert ids held. NOTE: the (expert, replica)
    slots of all layers are dealt round-robin over the workers, one layer after the other:
    the ``replicas`` slots of one expert are consecutive, so they land on distinct workers
    (``replicas <= ep``), and counts stay within one of each other (uneven counts are fine).
    """
    _require_moe(config, ep)
    n = config.num_experts
    if ep < 1:
        raise ValueError(f"ep={ep} must be at least 1 to place experts on expert workers")
    if not 1 <= replicas <= ep:
        raise ValueError(f"expert replicas={replicas} must be between 1 and ep={ep} (each replica on its own worker)")
    if ep > n * replicas:
        raise ValueError(
            f"ep={ep} is more expert workers than num_experts={n} x replicas={replicas} slots per layer; "
            f"some workers would hold nothing"
        )
    workers: list[dict[int, list[int]]] = [{} for _ in range(ep)]
    slot = 0
    for layer in config.moe_layers:
        for expert in range(n):
            for _ in range(replicas):
                workers[slot % ep].setdefault(layer, []).append(expert)
                slot += 1
    return [{layer: sorted(ids) for layer, ids in held.items()} for held in workers]


def stage_devices(device: str, pp: int, tp: int, first_gpu: int = 0) -> list[list[str]]:
    """The torch device of each rank of each stage: stage ``s`` gets ``cuda:{f+s*tp} .. cuda:{f+s*tp+tp-1}``
    (``f`` = ``first_gpu``, where this chain's GPUs start: chain ``c`` starts after chain ``c-1``'s)."""
    if device == "cuda":
        return [[f"cuda:{first_gpu + s * tp + r}" for r in range(tp)] for s in range(pp)]
    return [[device] * tp for _ in range(pp)]


def expert_devices(device: str, first_gpu: int, ep: int) -> list[str]:
    """The torch device of each expert worker: on CUDA the GPUs after the stages' (``cuda:{first_gpu + w}``)."""
    if device == "cuda":
        return [f"cuda:{first_gpu + w}" for w in range(ep)]
    return [device] * ep


def _check_tp(config: ModelConfig, tp: int) -> None:
    """Every split dimension divides evenly over ``tp`` ranks (see ``stagemesh.model.parallel``)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        raise ValueError(f"tp={tp} must divide num_attention_heads={heads}")
    if kv % tp and tp % kv:
        raise ValueError(
            f"tp={tp} and num_key_value_heads={kv}: one must divide the other "
            f"(KV heads are split over the ranks, or replicated when there are fewer of them than ranks)"
        )
    has_dense = any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    widths = {
        "intermediate_size": config.intermediate_size if has_dense else 0,
        "moe_intermediate_size": config.moe_intermediate_size,
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
    }
    for name, width in widths.items():
        if width % tp:
            raise ValueError(f"tp={tp} must divide {name}={width}")


HEAD_SAMPLED_FRACTION = 0.5
"""The share of a stage's tokens that ``lm_head`` runs on, as ``split_layers`` counts it: a
decode samples every token, a prefill chunk only its last one, and serving mixes both."""


def attention_cost(config: ModelConfig) -> float:
    """Multiply-adds per token of one layer's attention projections."""
    return float(config.hidden_size * (2 * config.q_size + 2 * config.kv_size))


def mlp_cost(config: ModelConfig, layer: int) -> float:
    """Multiply-adds per token of one layer's MLP (dense, or the routed and shared experts it runs)."""
    h = config.hidden_size
    if config.is_moe_layer(layer):
        mlp = 3 * h * (config.moe_intermediate_size * config.num_experts_per_tok + config.shared_expert_intermediate_size)
        return float(mlp + h * config.num_experts)  # + the router
    return float(3 * h * config.intermediate_size)


def layer_cost(config: ModelConfig, layer: int) -> float:
    """Multiply-adds per token of one decoder layer (attention projections + the MLP it runs)."""
    return attention_cost(config) + mlp_cost(config, layer)


def split_layers(config: ModelConfig, pp: int) -> list[StageSpec]:
    """Contiguous stages for ``pp`` minimising the slowest stage's cost.

    The unit is half a layer: a boundary may fall between a dense layer's attention and its
    MLP (``StageSpec.attn_only_end`` / ``mlp_only_start``), which balances the stages about
    twice as finely as whole layers; MoE layers stay whole. The last stage also pays for
    ``lm_head`` (vocab × hidden per sampled token, ``HEAD_SAMPLED_FRACTION``), so it tends
    to get less. Among equally balanced splits, the one with fewer cut layers wins.
    """
    n = config.num_hidden_layers
    if not 1 <= pp <= n:
        raise ValueError(f"pp={pp} must be between 1 and the model's {n} layers")
    pieces = [c for i in range(n) for c in (attention_cost(config), mlp_cost(config, i))]
    """Piece 2i is layer i's attention, 2i + 1 its MLP."""
    head = HEAD_SAMPLED_FRACTION * config.vocab_size * config.hidden_size
    prefix = [0.0]
    for c in pieces:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (head if b == 2 * n else 0.0)

    def can_end(b: int) -> bool:
        """A boundary before piece ``b``: between layers, or inside a dense layer."""
        return b % 2 == 0 or not config.is_moe_layer(b // 2)

    def holds_attention(a: int, b: int) -> bool:
        """Every stage needs a KV cache, so an attention piece."""
        return b - a > 1 or a % 2 == 0

    @lru_cache(maxsize=None)
    def best(start: int, stages: int) -> tuple[float, int, tuple[int, ...]]:
        """(max stage cost, cut layers, stage end pieces) for pieces [start, 2n) over ``stages`` stages."""
        if stages == 1:
            return cost(start, 2 * n) if holds_attention(start, 2 * n) else math.inf, 0, (2 * n,)
        options = [(math.inf, 0, ())]
        for end in range(start + 1, 2 * n):
            if can_end(end) and holds_attention(start, end):
                rest_cost, rest_cuts, rest_ends = best(end, stages - 1)
                options.append((max(cost(start, end), rest_cost), rest_cuts + end % 2, (end,) + rest_ends))
        return min(options)

    _, _, ends = best(0, pp)
    starts = (0,) + ends[:-1]
    return [StageSpec(a // 2, (b + 1) // 2, n, mlp_only_start=a % 2 == 1, attn_only_end=b % 2 == 1) for a, b in zip(starts, ends)]
