"""Batched sampling: greedy, temperature, top-k, top-p, each row with its own seeded stream.

NOTE: random rows use the Gumbel-max trick (argmax of logits/T + Gumbel noise samples from
softmax(logits/T)). The noise is a counter-based hash of (seed, token index, vocab id)
computed with integer tensor ops, so a row's draw depends only on its own seed and how many
tokens it has generated: the same request gives the same tokens in any batch, on any layout,
and after a failover re-prefill — and no per-row Python loop or torch.Generator is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors ([B] each)."""

    temperature: torch.Tensor  # float32; 0 means greedy
    top_k: torch.Tensor  # int64; 0 means off
    top_p: torch.Tensor  # float32 in (0, 1]
    seed: torch.Tensor  # int64
    index: torch.Tensor  # int64, tokens generated so far

    @classmethod
    def from_lists(cls, temperature, top_k, top_p, seed, index, device) -> "SamplingBatch":
        return cls(
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(top_k, dtype=torch.int64, device=device),
            torch.tensor(top_p, dtype=torch.float32, device=device),
            torch.tensor(seed, dtype=torch.int64, device=device),
            torch.tensor(index, dtype=torch.int64, device=device),
        )


def sample(logits: torch.Tensor, p: SamplingBatch) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (float32). Returns int64 [B]."""
    greedy = logits.argmax(dim=-1)
    random_rows = p.temperature > 0
    if not bool(random_rows.any()):
        return greedy
    temp = torch.where(random_rows, p.temperature, torch.ones_like(p.temperature))
    scaled = _filter_top_k_top_p(logits / temp[:, None], p.top_k, p.top_p)
    drawn = (scaled + _gumbel(p.seed, p.index, logits.shape[1])).argmax(dim=-1)
    return torch.where(random_rows, drawn, greedy)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    V = logits.shape[1]
    if not bool(((top_k > 0) & (top_k < V)).any() or (top_p < 1).any()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(V, device=logits.device)[None, :]
    keep = rank < torch.where(top_k > 0, top_k, V)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]  # mass before this token < p: the first always stays
    filtered = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, filtered)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values kept in [0, 2^32) inside int64, so nothing overflows)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _gumbel(seed: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    row = _mix(_mix((seed & _M32) ^ _mix((seed >> 32) & _M32)) ^ (index & _M32))  # [B]
    cols = _mix(torch.arange(vocab, device=seed.device, dtype=torch.int64))  # [V]
    bits = _mix(row[:, None] ^ cols[None, :])  # [B, V] uniform 32-bit
    u = (bits.double() + 0.5) / 2.0**32  # in (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).float()
