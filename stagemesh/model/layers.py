"""Small building blocks: RMSNorm, rotary position embedding, the gated SiLU MLP."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stagemesh.config import ModelConfig
from stagemesh.model.loader import CheckpointReader
from stagemesh.model.parallel import MergedColumnParallelLinear, RowParallelLinear, TPGroup


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 as the reference implementation does."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.copy_(reader.read(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if x.device.type == "cpu":
            # NOTE: torch's rms_norm does on CPU exactly the reference's float32 arithmetic below,
            # bit for bit (tests/model/test_layers.py), in one op instead of six: 17 against 36 µs
            # a call for a 64-wide row, one thread. Elsewhere it may fuse differently, so the
            # reference's ops stay (nothing here could check a GPU's rounding).
            x = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rope(NamedTuple):
    """One step's rotary tables, gathered once and shared by every layer."""

    cos: torch.Tensor  # [N, 1, D]
    sin: torch.Tensor  # [N, 1, D], first half negated: rotate_half(x) * sin == roll(x, D/2) * this


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout), cos/sin cached for every position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        inv_freq = _scaled_inv_freq(inv_freq, config.rope_scaling)
        pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        sin = emb.sin()
        sin[:, : d // 2].neg_()
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The tables for tokens at ``positions`` [N]."""
        return Rope(self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype))


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x: [N, heads, D], where rotate_half(x) = cat(-x2, x1).

    NOTE: rolling x by D/2 gives cat(x2, x1); the sign of rotate_half sits in ``rope.sin``.
    """
    return torch.addcmul(x * rope.cos, x.roll(x.shape[-1] // 2, -1), rope.sin)


def _scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # NOTE: llama3 scaling leaves high frequencies alone, divides low ones by `factor`,
    # and interpolates smoothly between the two wavelength bounds.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel (one all-reduce)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TPGroup, reduce: bool = True):
        super().__init__()
        self.gate_up = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias, tp)
        self.down = RowParallelLinear(intermediate, hidden, bias, tp, reduce=reduce)

    def load(self, reader: CheckpointReader, prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> None:
        """``names``: the gate, up and down projections under ``prefix`` (``TensorNames.mlp_proj``)."""
        gate, up, down = names
        self.gate_up.load(reader, [f"{prefix}.{gate}", f"{prefix}.{up}"])
        self.down.load(reader, f"{prefix}.{down}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_and_mul(self.gate_up(x)))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
