"""Mixture-of-Experts: the router in the stage, experts behind a narrow seam.

NOTE: the split is router → ``dispatch`` → experts → ``combine``. ``dispatch`` groups the
(token, choice) pairs by expert so each expert gets one contiguous block of rows;
``combine`` scatters the weighted expert outputs back to token order. Both are pure
functions. The experts behind the seam are ``LocalExperts`` (weights in this process) or,
in the mesh, remote expert workers that receive only their rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stagemesh.config import ModelConfig
from stagemesh.model.layers import GatedMLP, silu_and_mul
from stagemesh.model.loader import CheckpointReader
from stagemesh.model.packed_gemm import linear, pack_stacked
from stagemesh.model.parallel import ReplicatedLinear, TPGroup


@dataclass(frozen=True)
class Dispatch:
    """Routed rows grouped by expert."""

    x: torch.Tensor  # [N * K, H] the token rows, expert 0's first, then expert 1's, ...
    counts: torch.Tensor  # [E] rows per expert
    token_index: torch.Tensor  # [N * K] the token each row came from
    weights: torch.Tensor  # [N * K] the routing weight of each row


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, then the top-k; weights renormalised if asked."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [N, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Dispatch:
    """Group each token's top-k choices by expert. x: [N, H]; expert_ids, weights: [N, K]."""
    K = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [N * K], row-major: token 0's choices, token 1's, ...
    order = torch.argsort(flat, stable=True)  # rows sorted by expert, token order kept inside
    token_index = order // K
    counts = torch.bincount(flat, minlength=num_experts)
    return Dispatch(x[token_index], counts, token_index, weights.reshape(-1)[order])


def combine(outputs: torch.Tensor, weights: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum each row's weighted expert output into its token. outputs: [R, H] → [num_tokens, H]."""
    out = outputs.new_zeros(num_tokens, outputs.shape[1])
    return out.index_add_(0, token_index, outputs * weights.unsqueeze(1))


class Experts(Protocol):
    """Runs expert MLPs on grouped rows: ``counts[e]`` consecutive rows for expert ``e``."""

    def __call__(self, layer: int, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor: ...


class ExpertsOnRankZero:
    """Stands in for remote experts on TP ranks other than 0.

    With expert workers and TP, rank 0 alone asks the workers (it is the one that talks to
    the mesh); the other ranks contribute zero rows, and the MoE block's all-reduce — which
    sums every rank's partial output anyway — hands rank 0's answer to all of them.
    """

    def __call__(self, layer: int, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class LocalExperts(nn.Module):
    """Some experts of one MoE layer, held in this process; TP splits each expert's intermediate dim.

    The outputs are partial sums over TP ranks: the MoE block all-reduces once after combine.
    """

    def __init__(self, config: ModelConfig, expert_ids: list[int], tp: TPGroup):
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.inter = tp.shard(config.moe_intermediate_size, "moe intermediate size")
        self.tp = tp
        self.names = config.tensors
        E, H, I = len(expert_ids), config.hidden_size, self.inter
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * I, H), requires_grad=False)  # [E, 2I, H]
        self.w_down = nn.Parameter(torch.empty(E, H, I), requires_grad=False)  # [E, H, I]

    def load(self, reader: CheckpointReader, layer: int) -> None:
        gate, up, down = self.names.expert_proj
        lo, hi = self.tp.rank * self.inter, (self.tp.rank + 1) * self.inter
        for i, e in enumerate(self.expert_ids):
            p = self.names.expert.format(layer=layer, expert=e)
            self.w_gate_up[i, : self.inter].copy_(reader.read(f"{p}.{gate}.weight", dim=0, start=lo, end=hi))
            self.w_gate_up[i, self.inter :].copy_(reader.read(f"{p}.{up}.weight", dim=0, start=lo, end=hi))
            self.w_down[i].copy_(reader.read(f"{p}.{down}.weight", dim=1, start=lo, end=hi))
        pack_stacked(self, "w_gate_up")
        pack_stacked(self, "w_down")

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x: [R, H] grouped rows, ``counts[i]`` for ``self.expert_ids[i]``; one matmul pair per busy expert."""
        out = torch.empty_like(x)
        start = 0
        for i, n in enumerate(counts):
            if n:
                rows = x[start : start + n]
                h = silu_and_mul(linear(rows, self.w_gate_up[i]))
                out[start : start + n] = linear(h, self.w_down[i])
                start += n
        return out


class SparseMoE(nn.Module):
    """Router + routed experts (+ the Qwen2-MoE shared expert with its sigmoid gate)."""

    def __init__(self, config: ModelConfig, layer: int, tp: TPGroup, experts: Experts | None = None):
        super().__init__()
        self.layer = layer
        self.tp = tp
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.normalize = config.norm_topk_prob
        self.names = config.tensors
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts)
        self.local = LocalExperts(config, list(range(config.num_experts)), tp) if experts is None else None
        self.remote = experts
        self.shared = None
        if config.shared_expert_intermediate_size:
            # reduce=False: its down projection stays a partial sum; the block reduces once for all
            self.shared = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size, False, tp, reduce=False)
            self.shared_gate = ReplicatedLinear(config.hidden_size, 1)

    def load(self, reader: CheckpointReader) -> None:
        i, names = self.layer, self.names
        self.gate.load(reader, names.router.format(layer=i))
        if self.local is not None:
            self.local.load(reader, i)
        if self.shared is not None:
            self.shared.load(reader, names.shared_expert.format(layer=i), names.mlp_proj)
            self.shared_gate.load(reader, names.shared_expert_gate.format(layer=i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.normalize)  # [N, K] each
        d = dispatch(x, ids, weights, self.num_experts)
        if self.local is not None:
            outputs = self.local(d.x, d.counts.tolist())
        else:
            outputs = self.remote(self.layer, d.x, d.counts)
        out = combine(outputs, d.weights, d.token_index, x.shape[0])
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return self.tp.all_reduce(out)  # partial sums of every rank's expert slices

