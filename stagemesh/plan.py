"""Layout planning: whether a model can take a layout, and how its layers split into stages.

Torch-free: the launcher and the compose renderer plan without loading weights (callers that
plan for CUDA pass the visible GPU count in).
"""

from __future__ import annotations

from functools import lru_cache

from .config import ModelConfig, StageSpec


def validate_layout(config: ModelConfig, pp: int, tp: int, *, gpus: int | None = None) -> None:
    """Refuse a pipeline × tensor-parallel layout the model or the machine cannot take.

    ValueError naming the constraint and the numbers. ``gpus``: the visible CUDA device count
    when the layout runs on CUDA (one GPU per rank, ``pp × tp`` of them); None checks no GPUs.
    """
    n = config.num_hidden_layers
    if not 1 <= pp <= n:
        raise ValueError(f"pp={pp} must be between 1 and the model's {n} layers")
    if tp < 1:
        raise ValueError(f"tp={tp} must be at least 1")
    _check_tp(config, tp)
    if gpus is not None and pp * tp > gpus:
        raise ValueError(f"pp={pp} x tp={tp} needs {pp * tp} GPUs (one per rank) but {gpus} are visible")


def stage_devices(device: str, pp: int, tp: int) -> list[list[str]]:
    """The torch device of each rank of each stage: stage ``s`` gets ``cuda:{s*tp} .. cuda:{s*tp+tp-1}``."""
    if device == "cuda":
        return [[f"cuda:{s * tp + r}" for r in range(tp)] for s in range(pp)]
    return [[device] * tp for _ in range(pp)]


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


def layer_cost(config: ModelConfig, layer: int) -> float:
    """Multiply-adds per token of one decoder layer (attention projections + the MLP it runs)."""
    h = config.hidden_size
    attn = h * (2 * config.q_size + 2 * config.kv_size)
    if config.is_moe_layer(layer):
        mlp = 3 * h * (config.moe_intermediate_size * config.num_experts_per_tok + config.shared_expert_intermediate_size)
        mlp += h * config.num_experts  # router
    else:
        mlp = 3 * h * config.intermediate_size
    return float(attn + mlp)


def split_layers(config: ModelConfig, pp: int) -> list[StageSpec]:
    """Contiguous layer ranges for ``pp`` stages minimising the slowest stage's cost.

    The last stage also pays for ``lm_head`` (vocab × hidden per sampled token), so it tends
    to get fewer layers; uneven splits are normal.
    """
    n = config.num_hidden_layers
    if not 1 <= pp <= n:
        raise ValueError(f"pp={pp} must be between 1 and the model's {n} layers")
    costs = [layer_cost(config, i) for i in range(n)]
    head = float(config.vocab_size * config.hidden_size)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def span(a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (head if b == n else 0.0)

    @lru_cache(maxsize=None)
    def best(start: int, stages: int) -> tuple[float, tuple[int, ...]]:
        """(max stage cost, stage end points) for layers [start, n) over ``stages`` stages."""
        if stages == 1:
            return span(start, n), (n,)
        options = []
        for end in range(start + 1, n - stages + 2):
            rest_cost, rest_ends = best(end, stages - 1)
            options.append((max(span(start, end), rest_cost), (end,) + rest_ends))
        return min(options)

    _, ends = best(0, pp)
    starts = (0,) + ends[:-1]
    return [StageSpec(s, e, n) for s, e in zip(starts, ends)]
