"""Attention over the paged KV cache, for a micro-batch that mixes prefill chunks and decodes.

NOTE: one step's tokens are flattened to ``[N, ...]`` (chunk after chunk). For attention they
are scattered into a padded ``[B, max_q]`` layout, the keys of every sequence are gathered
from its blocks into ``[B, max_k]``, and one masked SDPA call covers the whole micro-batch —
no Python loop over sequences or tokens. The metadata is built once per step and shared by
every layer of the stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RotaryEmbedding
from .loader import CheckpointReader
from .parallel import QKVParallelLinear, RowParallelLinear, TPGroup


@dataclass(frozen=True)
class AttnMetadata:
    """Where each token of a step sits: positions, cache slots, padded layout and mask."""

    positions: torch.Tensor  # [N] position of each token in its sequence
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) each token's K/V goes to
    block_tables: torch.Tensor  # [B, blocks covering max_k] block ids, padded with 0
    q_index: torch.Tensor  # [N] index of each token in the padded [B * max_q] layout
    mask: torch.Tensor  # [B, 1, max_q, max_k] True where a query may attend to a key
    max_q: int
    max_k: int

    @classmethod
    def build(
        cls,
        starts: list[int],
        lens: list[int],
        tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        sliding_window: int | None = None,
    ) -> "AttnMetadata":
        B = len(starts)
        starts_t = torch.tensor(starts, dtype=torch.int64)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        seq_of = torch.repeat_interleave(torch.arange(B), lens_t)  # [N]
        first = torch.cumsum(lens_t, 0) - lens_t  # [B] index of each chunk's first token
        offset = torch.arange(int(lens_t.sum())) - first[seq_of]  # [N]
        positions = starts_t[seq_of] + offset
        max_q, max_k = max(lens), max(s + n for s, n in zip(starts, lens))
        nb = -(-max_k // block_size)
        bt = torch.zeros(B, nb, dtype=torch.int64)
        for i, t in enumerate(tables):
            bt[i, : min(nb, len(t))] = torch.tensor(t[:nb])
        slots = bt[seq_of, positions // block_size] * block_size + positions % block_size
        qpos = starts_t[:, None] + torch.arange(max_q)[None, :]  # [B, max_q]
        kpos = torch.arange(max_k)[None, None, :]  # [1, 1, max_k]
        mask = kpos <= qpos[:, :, None]  # causal, [B, max_q, max_k]
        if sliding_window:
            mask &= kpos > qpos[:, :, None] - sliding_window
        return cls(
            positions=positions.to(device),
            slots=slots.to(device),
            block_tables=bt.to(device),
            q_index=(seq_of * max_q + offset).to(device),
            mask=mask.unsqueeze(1).to(device),
            max_q=max_q,
            max_k=max_k,
        )


class Attention(nn.Module):
    """Multi-head attention with GQA; heads split over TP ranks; o_proj all-reduces."""

    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.qkv = QKVParallelLinear(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.qkv_bias, tp
        )
        self.num_heads, self.num_kv_heads = self.qkv.num_heads, self.qkv.num_kv_heads
        self.head_dim = config.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size, config.o_bias, tp)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.qkv.load(reader, prefix)
        self.o_proj.load(reader, f"{prefix}.o_proj")

    def forward(
        self,
        x: torch.Tensor,
        meta: AttnMetadata,
        rotary: RotaryEmbedding,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        N, d = x.shape[0], self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q, k = rotary(meta.positions, q.view(N, self.num_heads, d), k.view(N, self.num_kv_heads, d))
        # k_cache: [num_blocks, block_size, kv_heads, D] viewed as [slots, kv_heads, D]
        k_cache.view(-1, self.num_kv_heads, d).index_copy_(0, meta.slots, k)
        v_cache.view(-1, self.num_kv_heads, d).index_copy_(0, meta.slots, v.view(N, self.num_kv_heads, d))
        out = _paged_attention(q, k_cache, v_cache, meta)  # [N, Hq * D]
        return self.o_proj(out)


def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
    B, nb = meta.block_tables.shape
    _, block_size, kvh, d = k_cache.shape
    h = q.shape[1]
    keys = k_cache[meta.block_tables].view(B, nb * block_size, kvh, d)[:, : meta.max_k]  # [B, max_k, KVH, D]
    values = v_cache[meta.block_tables].view(B, nb * block_size, kvh, d)[:, : meta.max_k]
    padded = q.new_zeros(B * meta.max_q, h, d)
    padded[meta.q_index] = q
    padded = padded.view(B, meta.max_q, h, d)  # [B, max_q, Hq, D]
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2),  # [B, Hq, max_q, D]
        keys.transpose(1, 2),  # [B, KVH, max_k, D]
        values.transpose(1, 2),
        attn_mask=meta.mask,
        enable_gqa=h != kvh,
    )  # [B, Hq, max_q, D]
    return out.transpose(1, 2).reshape(B * meta.max_q, h * d)[meta.q_index]  # [N, Hq * D]
