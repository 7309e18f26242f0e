"""Paged attention against attention computed from scratch, over steps that mix decodes,
fresh prefills, prefill continuations and one-token prefill chunks.

Each sequence has a fixed random input history ``x`` [T, H]. A step feeds some of its rows
through ``Attention`` (which writes their K/V into the paged cache and attends over every
earlier row of the sequence); the reference recomputes q, k, v for the whole history and runs
plain causal attention, then takes the same rows. The cache only holds what earlier steps
wrote, so a wrong slot, block table, mask or padded index shows up as a mismatch.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from stagemesh.config import ModelConfig
from stagemesh.model.attention import Attention, AttnMetadata
from stagemesh.model.layers import RotaryEmbedding, apply_rope
from stagemesh.model.parallel import TPGroup

BLOCK = 4


def _config(window: int | None) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", family="llama", vocab_size=50, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=64, sliding_window=window,
    )


def _layer(config: ModelConfig) -> Attention:
    torch.manual_seed(0)
    attn = Attention(config, TPGroup())
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 1 / math.sqrt(config.hidden_size))
    return attn


def _reference(attn: Attention, rotary: RotaryEmbedding, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """Plain causal attention over the whole history x [T, H]: [T, H]."""
    T, d, h, kvh = x.shape[0], attn.head_dim, attn.num_heads, attn.num_kv_heads
    q, k, v = torch.nn.functional.linear(x, attn.qkv.weight).split([h * d, kvh * d, kvh * d], dim=-1)
    rope = rotary(torch.arange(T), x.dtype)
    q, k = apply_rope(q.view(T, h, d), rope), apply_rope(k.view(T, kvh, d), rope)
    k, v = k.repeat_interleave(h // kvh, 1), v.view(T, kvh, d).repeat_interleave(h // kvh, 1)  # [T, Hq, D]
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    pos = torch.arange(T)
    allowed = pos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[None, :] > pos[:, None] - window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, h * d)
    return torch.nn.functional.linear(out, attn.o_proj.weight)


# Each step: (sequence, tokens in this step). Sequences: a (10 tokens), b (10), c (8).
STEPS = [
    [("a", 5), ("b", 3)],  # two fresh prefills
    [("a", 1), ("b", 4), ("c", 6)],  # a one-token prefill chunk first, a continuation, a fresh prefill
    [("c", 1), ("a", 2), ("b", 1)],  # a decode, then a continuation, then a one-token chunk after it
    [("a", 1), ("b", 1), ("c", 1)],  # decodes only
    [("a", 1), ("b", 1)],
]


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_matches_attention_from_scratch(window):
    config = _config(window)
    attn, rotary = _layer(config), RotaryEmbedding(config)
    torch.manual_seed(1)
    history = {name: torch.randn(n, config.hidden_size) for name, n in (("a", 10), ("b", 10), ("c", 8))}
    expected = {name: _reference(attn, rotary, x, window) for name, x in history.items()}
    cache = torch.zeros(2, 32, BLOCK, config.num_key_value_heads, config.head_dim)  # [K/V, blocks, offset, KVH, D]
    # Blocks handed out in an interleaved order, so no sequence's blocks are contiguous.
    tables = {"a": [7, 2, 12], "b": [5, 9, 0], "c": [30, 1]}
    done = {name: 0 for name in history}
    with torch.inference_mode():
        for step in STEPS:
            starts = [done[name] for name, _ in step]
            lens = [n for _, n in step]
            meta = AttnMetadata.build(starts, lens, [tables[name] for name, _ in step], BLOCK, "cpu", window)
            x = torch.cat([history[name][s : s + n] for (name, n), s in zip(step, starts)])
            out = attn(x, meta, rotary(meta.positions, x.dtype), cache)
            want = torch.cat([expected[name][s : s + n] for (name, n), s in zip(step, starts)])
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            for name, n in step:
                done[name] += n
    assert all(done[name] == len(x) for name, x in history.items())  # every row was checked once


def test_metadata_sends_leading_one_token_chunks_through_the_decode_batch():
    meta = AttnMetadata.build([4, 9, 0, 3], [1, 1, 5, 1], [[0, 1], [2, 3, 4], [5, 6], [7]], BLOCK, "cpu")
    assert meta.num_decode == 2
    assert meta.decode.q_index is None and meta.decode.max_q == 1 and meta.decode.max_k == 10
    assert meta.prefill.max_q == 5 and meta.prefill.max_k == 5
    # Prefill tokens in the padded [2 chunks, 5] layout: chunk 0 fills row 0, chunk 1's one token opens row 1.
    assert meta.prefill.q_index.tolist() == [0, 1, 2, 3, 4, 5]
    # Positions and cache slots: block * 4 + offset.
    assert meta.positions.tolist() == [4, 9, 0, 1, 2, 3, 4, 3]
    assert meta.slots.tolist() == [1 * 4 + 0, 4 * 4 + 1, 20, 21, 22, 23, 6 * 4 + 0, 7 * 4 + 3]


@pytest.mark.parametrize("window", [None, 3, 40])
def test_a_decode_only_step_gets_the_general_paths_metadata(window):
    """A step of one-token chunks only (every decode step: ``attention._decode_only``) against
    the general path, which builds the same decode batch when a prefill chunk follows the
    decodes: random starts, interleaved blocks."""
    rng = random.Random(window)
    for rows in (1, 2, 7, 33):
        starts = [rng.randrange(0, 60) for _ in range(rows)]
        tables = [rng.sample(range(200), -(-(s + 1) // BLOCK) + rng.randrange(0, 2)) for s in starts]  # some longer
        fast = AttnMetadata.build(starts, [1] * rows, tables, BLOCK, "cpu", window)
        mixed = AttnMetadata.build(starts + [0], [1] * rows + [2], tables + [[199]], BLOCK, "cpu", window)
        assert fast.num_decode == mixed.num_decode == rows and fast.prefill is None
        assert torch.equal(fast.positions, mixed.positions[:rows]) and torch.equal(fast.slots, mixed.slots[:rows])
        a, b = fast.decode, mixed.decode
        assert (a.max_q, a.max_k, a.q_index) == (b.max_q, b.max_k, b.q_index)
        assert torch.equal(a.block_tables, b.block_tables) and torch.equal(a.mask, b.mask), (starts, window)
