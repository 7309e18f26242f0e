"""A received ``StageRequest`` as the runner takes it: the step plan and the input activations.

Every TP rank decodes the same bytes with this one function, so they all run the same step.
"""

from __future__ import annotations

import torch

from stagemesh.errors import InvalidArgument
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import StepPlan
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import plan_from_pb
from stagemesh.wire.codec.tensors import tensor_from_pb


def decode_request(
    request: stage_pb2.StageRequest, runner: StageRunner, name: str
) -> tuple[StepPlan, torch.Tensor | None]:
    """The plan and input activations of ``request`` for stage ``name``; InvalidArgument when it is malformed."""
    try:
        plan = plan_from_pb(request)
        hidden = None if runner.spec.is_first else _hidden(request, plan, runner)
    except ValueError as err:
        raise InvalidArgument(f"stage {name}: malformed StageRequest {request.step_id}: {err}") from err
    return plan, hidden


def _hidden(request: stage_pb2.StageRequest, plan: StepPlan, runner: StageRunner) -> torch.Tensor | None:
    if not plan.chunks and not request.HasField("hidden"):
        return None  # a plan that only frees needs no activations
    if not request.HasField("hidden"):
        raise ValueError(f"it has no hidden, which a stage of layers {runner.spec.label} needs")
    hidden = tensor_from_pb(request.hidden)  # [N, H], read-only view of the message's bytes
    want = [plan.num_tokens, runner.config.hidden_size]
    if list(hidden.shape) != want:
        raise ValueError(f"hidden has shape {list(hidden.shape)}; this step needs {want} (tokens, hidden_size)")
    return hidden.to(runner.device, runner.dtype)
