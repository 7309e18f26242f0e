"""Batched sampling: greedy, temperature, top-k, top-p, min-p, each row with its own seeded stream;
and the log-probabilities of the sampled tokens for the rows that ask (``token_logprobs``).

NOTE: random rows use the Gumbel-max trick (argmax of logits/T + Gumbel noise samples from
softmax(logits/T)). The noise is a counter-based hash of (seed, token index, vocab id)
computed with integer tensor ops, so a row's draw depends only on its own seed and how many
tokens it has generated: the same request gives the same tokens in any batch, on any layout,
and after a failover re-prefill — and no per-row Python loop or torch.Generator is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from stagemesh.serving.params import SAMPLE_FIELDS, SampleSpec

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors ([B] each): one per ``SampleSpec`` field that picks
    the token. ``logprobs`` / ``top_logprobs`` ask for something back instead: the stage runner
    reads them from the specs in Python (``token_logprobs``), so they are no tensors here."""

    seed: torch.Tensor  # int64
    index: torch.Tensor  # int64, tokens generated so far
    temperature: torch.Tensor  # float32; 0 means greedy
    top_k: torch.Tensor  # int64; 0 means off
    top_p: torch.Tensor  # float32 in (0, 1]
    min_p: torch.Tensor  # float32 in [0, 1]; 0 means off

    @classmethod
    def of(cls, specs: Sequence[SampleSpec], device: torch.device | str) -> "SamplingBatch":
        """The batch of ``specs`` (one row each), built field by field (each a ``SAMPLE_FIELDS`` one)."""
        return cls(**{
            f.name: torch.tensor([getattr(s, f.name) for s in specs], dtype=_DTYPES[SAMPLE_FIELDS[f.name]],
                                 device=device)
            for f in fields(cls)
        })


_DTYPES = {int: torch.int64, float: torch.float32}


def sample(logits: torch.Tensor, p: SamplingBatch) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (float32). Returns int64 [B]."""
    greedy = logits.argmax(dim=-1)
    random_rows = p.temperature > 0
    if not bool(random_rows.any()):
        return greedy
    temp = torch.where(random_rows, p.temperature, torch.ones_like(p.temperature))
    scaled = _filter_min_p(_filter_top_k_top_p(logits / temp[:, None], p.top_k, p.top_p), p.min_p)
    drawn = (scaled + _gumbel(p.seed, p.index, logits.shape[1])).argmax(dim=-1)
    return torch.where(random_rows, drawn, greedy)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution: log_softmax of ``logits`` [B, V]
    (float32, before temperature and the top-k/top-p/min-p filters, as vLLM returns by default).
    Returns the log-probability of ``tokens`` [B] -> [B], and the ids and log-probabilities of the
    ``top_n`` most likely tokens, most likely first -> [B, top_n] each."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [B]
    top = logprobs.topk(top_n, dim=-1)  # [B, top_n]
    return chosen, top.indices, top.values


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


def _filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop the tokens whose probability is below ``min_p`` times the row's largest (vLLM's min-p).

    p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p), so no softmax is needed;
    log(0) = -inf keeps every token of a row with min_p = 0.
    """
    if not bool((min_p > 0).any()):
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None]  # [B, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


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
