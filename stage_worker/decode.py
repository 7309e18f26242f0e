"""The stage's edge: a received ``StageRequest`` becomes a ``StageStep`` once, and a step goes
back on the wire once (to the next stage, or to the other TP ranks).

The servicer decodes each request here; everything after it (the pipeline, the pending-token
fill, the stage, the TP ranks, the runner) works on the ``StageStep``. Every TP rank decodes
rank 0's bytes with the same function, so they all run the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagemesh.errors import InvalidArgument
from stagemesh.serving.types import StepPlan
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import plan_from_pb, plan_to_pb
from stagemesh.wire.codec.tensors import tensor_from_pb, tensor_to_pb


@dataclass(frozen=True)
class StageStep:
    """One micro-batch as this stage runs it."""

    plan: StepPlan
    hidden: torch.Tensor | None = None
    """The previous stage's activations [N, H] as they came off the wire (CPU, the sender's
    dtype, read-only); None on the first stage, which embeds the plan's token ids. The runner
    moves them to its device and dtype on the step thread."""


def decode_step(request: stage_pb2.StageRequest, name: str) -> StageStep:
    """The step of ``request`` for stage ``name``; InvalidArgument when it is malformed."""
    try:
        hidden = tensor_from_pb(request.hidden) if request.HasField("hidden") else None
        return StageStep(plan_from_pb(request), hidden)
    except ValueError as err:
        raise InvalidArgument(f"stage {name}: malformed StageRequest {request.step_id}: {err}") from err


def encode_step(plan: StepPlan, hidden: torch.Tensor | None) -> stage_pb2.StageRequest:
    """The StageRequest that runs ``plan`` on ``hidden`` (both as this stage ran or produced them)."""
    return plan_to_pb(plan, None if hidden is None else tensor_to_pb(hidden))
