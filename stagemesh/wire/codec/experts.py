"""``Expert.Run`` messages <-> the grouped rows of one MoE layer (needs torch: workers only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagemesh.v1 import expert_pb2
from stagemesh.wire.codec.messages import error_from_pb, error_to_pb
from stagemesh.wire.codec.tensors import tensor_from_pb, tensor_to_pb


@dataclass(frozen=True)
class ExpertBatch:
    """The rows of one MoE layer of one step sent to one expert worker, grouped by expert."""

    step_id: int
    layer: int
    """Global decoder layer."""
    expert_ids: tuple[int, ...]
    """Increasing; rows ``[sum(counts[:i]), sum(counts[:i+1]))`` go to ``expert_ids[i]``."""
    counts: tuple[int, ...]
    hidden: torch.Tensor
    """[sum(counts), H]"""


def expert_request_to_pb(batch: ExpertBatch) -> expert_pb2.ExpertRequest:
    return expert_pb2.ExpertRequest(
        step_id=batch.step_id,
        layer=batch.layer,
        expert_ids=batch.expert_ids,
        counts=batch.counts,
        hidden=tensor_to_pb(batch.hidden),
    )


def expert_request_from_pb(msg: expert_pb2.ExpertRequest) -> ExpertBatch:
    """The batch of a request; ValueError naming what is malformed."""
    if len(msg.expert_ids) != len(msg.counts):
        raise ValueError(f"ExpertRequest has {len(msg.expert_ids)} expert_ids but {len(msg.counts)} counts")
    if any(n < 0 for n in msg.counts):
        raise ValueError(f"ExpertRequest counts must be >= 0, got {list(msg.counts)}")
    if list(msg.expert_ids) != sorted(set(msg.expert_ids)):
        raise ValueError(f"ExpertRequest expert_ids must be increasing, got {list(msg.expert_ids)}")
    hidden = tensor_from_pb(msg.hidden)  # [R, H], read-only view of the message's bytes
    if hidden.dim() != 2 or hidden.shape[0] != sum(msg.counts):
        rows = sum(msg.counts)
        raise ValueError(f"ExpertRequest hidden has shape {list(hidden.shape)}; counts add up to {rows} rows")
    return ExpertBatch(msg.step_id, msg.layer, tuple(msg.expert_ids), tuple(msg.counts), hidden)


def expert_output_to_pb(step_id: int, layer: int, out: torch.Tensor) -> expert_pb2.ExpertResponse:
    return expert_pb2.ExpertResponse(step_id=step_id, layer=layer, out=tensor_to_pb(out))


def expert_output_from_pb(msg: expert_pb2.ExpertResponse, rows: int) -> torch.Tensor:
    """The [rows, H] outputs of a response; raises the StagemeshError it carries when the batch failed."""
    if msg.HasField("error"):
        raise error_from_pb(msg.error)
    out = tensor_from_pb(msg.out)
    if out.dim() != 2 or out.shape[0] != rows:
        raise ValueError(f"ExpertResponse out has shape {list(out.shape)}; {rows} rows were sent")
    return out


def failed_expert_to_pb(step_id: int, err: BaseException, layer: int = 0) -> expert_pb2.ExpertResponse:
    """The ExpertResponse of a batch that raised ``err`` (or could not be delivered)."""
    return expert_pb2.ExpertResponse(step_id=step_id, layer=layer, error=error_to_pb(err))
