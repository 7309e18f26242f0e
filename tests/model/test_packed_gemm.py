"""The packed oneDNN linear gives F.linear's numbers for every batch size the engine uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stagemesh.model import packed_gemm
from stagemesh.model.parallel import RowParallelLinear, TPGroup

needs_onednn = pytest.mark.skipif(
    not packed_gemm.can_pack(torch.empty(2, 2)), reason="this torch build has no oneDNN linear ops; layers use F.linear"
)


@needs_onednn
@pytest.mark.parametrize("rows", [0, 1, 7, 64, 300])
def test_packed_linear_matches_f_linear(rows):
    torch.manual_seed(rows)
    w, b = torch.randn(96, 40), torch.randn(96)
    x = torch.randn(rows, 80)[:, ::2]  # strided rows, as the attention output slices are
    packed = packed_gemm.pack(w)
    assert packed.is_mkldnn and packed.shape == w.shape
    with torch.inference_mode():
        torch.testing.assert_close(packed_gemm.linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_pack_weight_replaces_the_weight_without_a_second_copy():
    layer = RowParallelLinear(640, 512, bias=False, tp=TPGroup())  # past PACK_MIN_ELEMENTS
    torch.nn.init.normal_(layer.weight, std=640**-0.5)  # outputs ~1, as a model's are
    plain = layer.weight.detach().clone()
    packed_gemm.pack_weight(layer)
    assert layer.weight.is_mkldnn and [p.is_mkldnn for p in layer.parameters()] == [True]
    x = torch.randn(5, 640)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, plain), rtol=1e-5, atol=1e-5)


def test_a_small_weight_stays_plain_where_a_packed_call_would_cost_more_than_it_saves():
    layer = RowParallelLinear(128, 64, bias=False, tp=TPGroup())  # a 64-wide model's MLP down projection
    packed_gemm.pack_weight(layer)
    assert not layer.weight.is_mkldnn
    experts = torch.nn.Module()
    experts.w = torch.nn.Parameter(torch.randn(3, 16, 8), requires_grad=False)
    packed_gemm.pack_stacked(experts, "w")
    assert isinstance(experts.w, torch.nn.Parameter) and not experts.w.is_mkldnn


def test_other_dtypes_and_shapes_stay_plain():
    for weight in (torch.randn(8, 4, dtype=torch.bfloat16), torch.randn(2, 8, 4)):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        packed_gemm.pack_weight(layer)
        assert layer.weight is not None and not layer.weight.is_mkldnn
    x, w = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    assert torch.equal(packed_gemm.linear(x, w), F.linear(x, w))


@needs_onednn
def test_pack_stacked_packs_each_expert_and_keeps_it_indexable():
    experts = torch.nn.Module()
    experts.w = torch.nn.Parameter(torch.randn(3, 1024, 256) / 16, requires_grad=False)  # [E, out, in], outputs ~1
    plain = experts.w.detach().clone()
    packed_gemm.pack_stacked(experts, "w")
    assert len(experts.w) == 3 and all(w.is_mkldnn for w in experts.w)
    x = torch.randn(5, 256)
    with torch.inference_mode():
        for i in range(3):
            torch.testing.assert_close(packed_gemm.linear(x, experts.w[i]), F.linear(x, plain[i]), rtol=1e-5,
                                       atol=1e-5)
