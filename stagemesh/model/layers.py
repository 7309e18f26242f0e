"""Small building blocks: RMSNorm, rotary position embedding, the gated SiLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .loader import CheckpointReader
from .parallel import MergedColumnParallelLinear, RowParallelLinear, TPGroup


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
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [N, Hq, D], k: [N, Hk, D], positions: [N]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [N, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


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
        gate, up, down = names
        self.gate_up.load(reader, [f"{prefix}.{gate}", f"{prefix}.{up}"])
        self.down.load(reader, f"{prefix}.{down}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_and_mul(self.gate_up(x)))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
