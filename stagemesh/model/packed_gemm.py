"""Float32 linear layers on CPU through oneDNN, with each weight packed once at load.

NOTE: why. ``F.linear`` on CPU runs MKL's sgemm, which re-packs the whole weight matrix on
every call. At decode batch sizes (a few to a few dozen rows per step) that re-packing costs
as much as the multiply itself. oneDNN's inner product with the weight reordered once into
its blocked layout does not: on the 2-core reference machine the six layers and ``lm_head``
of the 40M benchmark model ran at 190 GFLOP/s at 35 rows against 97 for ``F.linear``
(BENCHMARKS.md, "packed GEMM"). The packed weight replaces the plain one (no second copy);
layers call ``linear`` below, which takes either.

The ops are torch's own (``torch.ops.mkldnn``, the ones inductor emits for CPU linears).
Where they are missing (a torch built without oneDNN), on other devices and for other
dtypes, weights stay plain and ``linear`` is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 64
"""Rows the packed layout is tuned for; measured to serve 1 to 512 rows equally well."""


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


def pack_weight(module: nn.Module, name: str = "weight") -> None:
    """Replace ``module.<name>`` with its packed form when ``can_pack`` allows; else leave it."""
    weight = getattr(module, name)
    if can_pack(weight):
        setattr(module, name, nn.Parameter(pack(weight.detach()), requires_grad=False))


def pack_stacked(module: nn.Module, name: str) -> None:
    """Replace ``module.<name>``, one weight per expert stacked as [E, out, in], with a
    ``ParameterList`` of E packed weights when ``can_pack`` allows; ``<name>[i]`` stays expert i's."""
    stacked = getattr(module, name)
    if len(stacked) and can_pack(stacked[0]):
        packed = nn.ParameterList([nn.Parameter(pack(w), requires_grad=False) for w in stacked.detach()])
        delattr(module, name)  # a Parameter attribute cannot be reassigned to a module
        setattr(module, name, packed)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ + b for a plain or a packed ``weight`` [out, in]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
