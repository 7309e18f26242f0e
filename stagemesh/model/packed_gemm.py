"""Float32 linear layers on CPU through oneDNN, with each weight packed once at load.

NOTE: why. ``F.linear`` on CPU runs MKL's sgemm, which re-packs the whole weight matrix on
every call. At decode batch sizes (a few to a few dozen rows per step) that re-packing costs
as much as the multiply itself. oneDNN's inner product with the weight reordered once into
its blocked layout does not: on the 2-core reference machine the six layers and ``lm_head``
of the 40M benchmark model ran at 190 GFLOP/s at 35 rows against 97 for ``F.linear``
(BENCHMARKS.md, "packed GEMM"). The packed weight replaces the plain one (no second copy);
layers call ``linear`` below, which takes either.

The ops are torch's own (``torch.ops.mkldnn``, the ones inductor emits for CPU linears).
Where they are missing (a torch built without oneDNN), on other devices, for other dtypes and
for small weights (``PACK_MIN_ELEMENTS``), weights stay plain and ``linear`` is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 64
"""Rows the packed layout is tuned for; measured to serve 1 to 512 rows equally well."""
PACK_MIN_ELEMENTS = 1 << 18
"""Weights smaller than this (512 x 512) stay plain.

NOTE: a packed call pays ~25 µs of oneDNN bookkeeping whatever its size (py-spy: the
primitive-cache lookup), which small weights never earn back. One thread, µs per call of
``F.linear`` / packed at 1, 32 and 128 rows (2026-12-06): 192 x 64: 10 / 31, 12 / 40, 32 / 58;
384 x 384: 15 / 31, 113 / 117, 416 / 439; 512 x 512: 25 / 48, 175 / 131, 566 / 533; 1,536 x
512: 144 / 219, 789 / 560, 2,110 / 1,643. Below 512 x 512 the plain call was as fast or faster
at every row count; from it on the packed one wins at decode batch sizes."""


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and not weight.is_mkldnn
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in oneDNN's blocked layout (an opaque ``torch._mkldnn`` tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)


def worth_packing(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [out, in] can be packed and is big enough to gain by it."""
    return can_pack(weight) and weight.numel() >= PACK_MIN_ELEMENTS


def pack_weight(module: nn.Module, name: str = "weight") -> None:
    """Replace ``module.<name>`` with its packed form when ``worth_packing``; else leave it."""
    weight = getattr(module, name)
    if worth_packing(weight):
        setattr(module, name, nn.Parameter(pack(weight.detach()), requires_grad=False))


def pack_stacked(module: nn.Module, name: str) -> None:
    """Replace ``module.<name>``, one weight per expert stacked as [E, out, in], with a
    ``ParameterList`` of E packed weights when ``worth_packing``; ``<name>[i]`` stays expert i's."""
    stacked = getattr(module, name)
    if len(stacked) and worth_packing(stacked[0]):
        packed = nn.ParameterList([nn.Parameter(pack(w), requires_grad=False) for w in stacked.detach()])
        delattr(module, name)  # a Parameter attribute cannot be reassigned to a module
        setattr(module, name, packed)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ + b for a plain or a packed ``weight`` [out, in]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
