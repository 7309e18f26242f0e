"""Layout planning: how the layers of a model are split into pipeline stages.

Torch-free: the launcher and the compose renderer plan without loading weights.
"""

from __future__ import annotations

from functools import lru_cache

from .config import ModelConfig, StageSpec


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
