"""Attention over the paged KV cache, for a micro-batch that mixes prefill chunks and decodes.

NOTE: one step's tokens are flattened to ``[N, ...]`` (chunk after chunk; the scheduler puts
one-token decode chunks first). The metadata, built once per step and shared by every layer,
splits the chunks in two padded batches:

- the leading one-token chunks (decodes), attended as ``[B, 1]`` queries: no scatter of
  queries, no mask over query rows — the common case, and the one every decode step is;
- the rest (prefill chunks), scattered into a padded ``[B, max_q]`` layout.

For each batch the keys and values of every sequence are gathered from its blocks
(``index_select`` over block ids), and one SDPA call with an additive mask built per step
covers the batch — no Python loop over sequences or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stagemesh.config import ModelConfig
from stagemesh.model.layers import Rope, apply_rope
from stagemesh.model.loader import CheckpointReader
from stagemesh.model.parallel import QKVParallelLinear, RowParallelLinear, TPGroup


@dataclass(frozen=True)
class PaddedBatch:
    """Some chunks of a step laid out as ``[B, max_q]`` queries over ``[B, max_k]`` cached keys."""

    block_tables: torch.Tensor  # [B, blocks covering max_k] block ids, padded with 0
    mask: torch.Tensor  # [B, 1, max_q, max_k] additive: 0 where a query may attend to a key, -inf elsewhere
    q_index: torch.Tensor | None  # [n] index of each token in the padded [B * max_q] layout; None when max_q == 1
    max_q: int
    max_k: int


@dataclass(frozen=True)
class AttnMetadata:
    """Where each token of a step sits: positions, cache slots, and its padded batch."""

    positions: torch.Tensor  # [N] position of each token in its sequence
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) each token's K/V goes to
    num_decode: int  # leading one-token chunks (= their tokens), attended through ``decode``
    decode: PaddedBatch | None
    prefill: PaddedBatch | None  # every chunk after the leading one-token ones

    @classmethod
    def build(
        cls,
        starts: list[int],
        lens: list[int],
        tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        sliding_window: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "AttnMetadata":
        B = len(starts)
        nd = next((i for i, n in enumerate(lens) if n != 1), B)
        if nd == B:
            return _decode_only(starts, tables, block_size, device, sliding_window, dtype)
        starts_t = torch.tensor(starts, dtype=torch.int64)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        nb = -(-max(s + n for s, n in zip(starts, lens)) // block_size)
        bt = _block_tables(tables, nb)  # [B, nb]
        seq_of, offset = _token_layout(lens_t)
        positions = starts_t[seq_of] + offset
        slots = bt[seq_of, positions // block_size] * block_size + positions % block_size
        batch = dict(block_size=block_size, window=sliding_window, dtype=dtype, device=device)
        return cls(
            positions=positions.to(device),
            slots=slots.to(device),
            num_decode=nd,
            decode=_padded(starts_t[:nd], lens_t[:nd], bt[:nd], **batch) if nd else None,
            prefill=_padded(starts_t[nd:], lens_t[nd:], bt[nd:], **batch) if nd < B else None,
        )



def _decode_only(starts: list[int], tables: list[list[int]], block_size: int, device: torch.device | str,
                 window: int | None, dtype: torch.dtype) -> AttnMetadata:
    """``AttnMetadata.build`` for a step of one-token chunks only (every decode step), equal to
    its general path. NOTE: a chunk's one token sits at its start, so positions and slots are
    read off the Python lists: the general path's token layout, gathers and reductions cost a
    one-row step ~110 µs, a sixth of a one-layer stage's step here (``tests/model/test_attention.py``
    checks both paths agree)."""
    positions = torch.tensor(starts, dtype=torch.int64)
    slots = torch.tensor([t[s // block_size] * block_size + s % block_size for s, t in zip(starts, tables)],
                         dtype=torch.int64)
    max_k = max(starts) + 1
    # the mask as ``_padded`` builds it, in two dimensions instead of three: its 3-D broadcasts
    # and views cost this path 8-30 µs more (measured)
    kpos = torch.arange(max_k)[None, :]  # [1, max_k]
    allowed = kpos <= positions[:, None]  # causal, [B, max_k]
    if window:
        allowed &= kpos > positions[:, None] - window
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    bt = _block_tables(tables, -(-max_k // block_size))
    decode = PaddedBatch(block_tables=bt.to(device), mask=mask[:, None, None, :].to(device), q_index=None,
                         max_q=1, max_k=max_k)
    return AttnMetadata(positions=positions.to(device), slots=slots.to(device), num_decode=len(starts),
                        decode=decode, prefill=None)


def _block_tables(tables: list[list[int]], nb: int) -> torch.Tensor:
    """[B, nb]: each sequence's first ``nb`` block ids, padded with 0."""
    return torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in tables], dtype=torch.int64)


def _token_layout(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For chunks of ``lens`` tokens laid end to end: each token's chunk and its index inside it, [N] each."""
    seq_of = torch.repeat_interleave(torch.arange(len(lens)), lens)
    offset = torch.arange(len(seq_of)) - (torch.cumsum(lens, 0) - lens)[seq_of]
    return seq_of, offset


def _padded(
    starts: torch.Tensor,
    lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    block_size: int,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> PaddedBatch:
    """The padded layout and mask of chunks ``(starts, lens)``; ``block_tables`` rows are theirs."""
    max_q, max_k = int(lens.max()), int((starts + lens).max())
    qpos = starts[:, None] + torch.arange(max_q)[None, :]  # [B, max_q]
    kpos = torch.arange(max_k)[None, None, :]  # [1, 1, max_k]
    allowed = kpos <= qpos[:, :, None]  # causal, [B, max_q, max_k]
    if window:
        allowed &= kpos > qpos[:, :, None] - window
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    q_index = None
    if max_q > 1:
        seq_of, offset = _token_layout(lens)
        q_index = (seq_of * max_q + offset).to(device)
    nb = -(-max_k // block_size)
    return PaddedBatch(
        block_tables=block_tables[:, :nb].to(device),
        mask=mask.unsqueeze(1).to(device),
        q_index=q_index,
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

    def load(self, reader: CheckpointReader, prefix: str, names=("q_proj", "k_proj", "v_proj", "o_proj")) -> None:
        """``names``: the q, k, v and output projections under ``prefix`` (``TensorNames.attention_proj``)."""
        q, k, v, o = names
        self.qkv.load(reader, [f"{prefix}.{q}", f"{prefix}.{k}", f"{prefix}.{v}"])
        self.o_proj.load(reader, f"{prefix}.{o}")

    def forward(self, x: torch.Tensor, meta: AttnMetadata, rope: Rope, kv_cache: torch.Tensor) -> torch.Tensor:
        """x: [N, H]; kv_cache: this layer's [2, blocks, block_size, KVH, D]. Returns [N, H]."""
        N, d, h, kvh = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(x)  # [N, (Hq + 2 KVH) * D]
        qk = apply_rope(qkv[:, : (h + kvh) * d].view(N, h + kvh, d), rope)  # [N, Hq + KVH, D], q and k rotated at once
        q, k = qk.split([h, kvh], dim=1)
        v = qkv[:, (h + kvh) * d :].view(N, kvh, d)
        flat = kv_cache.view(2, -1, kvh, d)  # [2, slots, KVH, D]
        flat[0].index_copy_(0, meta.slots, k)
        flat[1].index_copy_(0, meta.slots, v)
        nd = meta.num_decode
        parts = []
        if meta.decode is not None:
            parts.append(_paged_attention(q[:nd], kv_cache, meta.decode))
        if meta.prefill is not None:
            parts.append(_paged_attention(q[nd:], kv_cache, meta.prefill))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, Hq * D]
        return self.o_proj(out)


def _paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    """q: [n, Hq, D], the tokens of ``batch``'s chunks in order. Returns [n, Hq * D]."""
    B, nb = batch.block_tables.shape
    _, _, block_size, kvh, d = kv_cache.shape
    h = q.shape[1]
    blocks = batch.block_tables.flatten()
    # NOTE: index_select, not kv_cache[:, tables]: advanced indexing copies 4-7x slower here.
    k, v = (kv_cache[i].index_select(0, blocks).view(B, nb * block_size, kvh, d)[:, : batch.max_k] for i in (0, 1))  # [B, max_k, KVH, D]
    if batch.q_index is None:
        padded = q.unsqueeze(1)  # [B, 1, Hq, D]: one token per chunk, nothing to scatter
    else:
        padded = q.new_zeros(B * batch.max_q, h, d)
        padded[batch.q_index] = q
        padded = padded.view(B, batch.max_q, h, d)  # [B, max_q, Hq, D]
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2),  # [B, Hq, max_q, D]
        k.transpose(1, 2),  # [B, KVH, max_k, D]
        v.transpose(1, 2),
        attn_mask=batch.mask,
        enable_gqa=h != kvh,
    )  # [B, Hq, max_q, D]
    out = out.transpose(1, 2).reshape(B * batch.max_q, h * d)
    return out if batch.q_index is None else out[batch.q_index]  # [n, Hq * D]
