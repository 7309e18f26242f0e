"""RMSNorm gives transformers' LlamaRMSNorm bit for bit (its CPU path is torch's rms_norm)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from stagemesh.model.layers import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
def test_rms_norm_is_transformers_bit_for_bit(dtype, hidden):
    torch.manual_seed(hidden)
    ours, theirs = RMSNorm(hidden, 1e-5), LlamaRMSNorm(hidden, eps=1e-5)
    weight = torch.randn(hidden)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    for rows in (1, 7, 128):
        x = (torch.randn(rows, hidden) * 3).to(dtype)
        with torch.inference_mode():
            assert torch.equal(ours(x), theirs(x)), (rows, (ours(x) - theirs(x)).abs().max())
