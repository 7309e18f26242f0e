"""Megatron-style tensor-parallel layers with the collectives in plain sight.

Every layer takes a ``TPGroup`` (rank, size, process group) and loads only its own shard of
each checkpoint tensor in ``load``. With ``size == 1`` every layer is the plain operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stagemesh.model.loader import CheckpointReader
from stagemesh.model.packed_gemm import linear, pack_weight


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a stage's tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: Any = None
    """The torch.distributed process group (None when size == 1)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dimension."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, n: int, what: str) -> int:
        """Size of one rank's share of ``n``; refuses an uneven split."""
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tp={self.size}")
        return n // self.size


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ReplicatedLinear(nn.Module):
    """A linear layer every rank holds whole (the MoE router, the shared-expert gate)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.weight.copy_(reader.read(f"{prefix}.weight"))
        if self.bias is not None:
            self.bias.copy_(reader.read(f"{prefix}.bias"))
        pack_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W's output rows split over ranks and one or more checkpoint tensors
    stacked along the output (gate+up, or q+k+v). No communication: each rank keeps its columns of y.
    """

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.part_sizes = part_sizes  # rows of each part on this rank
        self.weight = _param(sum(part_sizes), in_features)
        self.bias = _param(sum(part_sizes)) if bias else None

    def load_parts(self, reader: CheckpointReader, prefixes: list[str], row_ranges: list[tuple[int, int]]) -> None:
        """Load part i from ``prefixes[i]`` rows ``row_ranges[i]`` of the full checkpoint tensor."""
        offset = 0
        for prefix, (start, end), size in zip(prefixes, row_ranges, self.part_sizes):
            self.weight[offset : offset + size].copy_(reader.read(f"{prefix}.weight", dim=0, start=start, end=end))
            if self.bias is not None:
                self.bias[offset : offset + size].copy_(reader.read(f"{prefix}.bias", dim=0, start=start, end=end))
            offset += size
        pack_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several equally split column-parallel projections in one matmul (gate_proj + up_proj)."""

    def __init__(self, in_features: int, out_features: list[int], bias: bool, tp: TPGroup):
        super().__init__(in_features, [tp.shard(n, "intermediate size") for n in out_features], bias, tp)

    def load(self, reader: CheckpointReader, prefixes: list[str]) -> None:
        ranges = [(self.tp.rank * s, (self.tp.rank + 1) * s) for s in self.part_sizes]
        self.load_parts(reader, prefixes, ranges)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, attention heads split over ranks.

    When there are fewer KV heads than ranks, each rank holds the one KV head its query
    heads use (KV heads replicated); otherwise KV heads are split like the query heads.
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, tp: TPGroup):
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = tp.shard(num_kv_heads, "num_key_value_heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        elif tp.size % num_kv_heads:
            raise ValueError(f"tp={tp.size} must be a multiple of num_key_value_heads={num_kv_heads} when it exceeds it")
        else:
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank * num_kv_heads // tp.size
        self.head_dim = head_dim
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden, [q, kv, kv], bias, tp)

    def load(self, reader: CheckpointReader, prefixes: list[str]) -> None:
        """``prefixes``: the q, k and v projections' checkpoint names."""
        d = self.head_dim
        q0 = self.tp.rank * self.num_heads * d
        k0 = self.kv_head_start * d
        kv = self.num_kv_heads * d
        self.load_parts(reader, prefixes, [(q0, q0 + self.num_heads * d), (k0, k0 + kv), (k0, k0 + kv)])


class RowParallelLinear(nn.Module):
    """y = x Wᵀ with W's input columns split over ranks; one all-reduce sums the partial y.

    ``reduce=False`` leaves y a partial sum for a caller that reduces several of them at once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, reduce: bool = True):
        super().__init__()
        self.tp = tp
        self.reduce = reduce
        self.in_local = tp.shard(in_features, "input size of a row-parallel layer")
        self.weight = _param(out_features, self.in_local)
        self.bias = _param(out_features) if bias else None

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        start = self.tp.rank * self.in_local
        self.weight.copy_(reader.read(f"{prefix}.weight", dim=1, start=start, end=start + self.in_local))
        if self.bias is not None:
            self.bias.copy_(reader.read(f"{prefix}.bias"))
        pack_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        if self.reduce:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


class _VocabShard(nn.Module):
    """Rows ``[start, end)`` of a [vocab, hidden] matrix, padded to an even share per rank."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)  # ceil: the last rank's share is padded
        self.start = tp.rank * self.rows
        self.end = min(vocab_size, self.start + self.rows)
        self.weight = _param(self.rows, hidden)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.zero_()
        self.weight[: self.end - self.start].copy_(reader.read(name, dim=0, start=self.start, end=self.end))


class VocabParallelEmbedding(_VocabShard):
    """Token embedding with the vocabulary split over ranks; one all-reduce joins the rows."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        x = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        x = x * mine.unsqueeze(-1).to(x.dtype)
        return self.tp.all_reduce(x)


class ParallelLMHead(_VocabShard):
    """The output projection with the vocabulary split over ranks; logits gathered whole."""

    def load(self, reader: CheckpointReader, name: str) -> None:
        super().load(reader, name)
        pack_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last(linear(x, self.weight))  # [B, rows * tp]
        return logits[:, : self.vocab_size]
