"""The stage's edge: a received ``StageRequest`` becomes a ``StageStep`` once, and a step goes
back on the wire once (to the next stage, or to the other TP ranks).

The servicer decodes each request here; everything after it (the pipeline, the pending-token
fill, the stage, the TP ranks, the runner) works on the ``StageStep``. Every TP rank decodes
rank 0's bytes with the same function, so they all run the same step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from stagemesh.errors import InvalidArgument
from stagemesh.serving.types import StepPlan
from stagemesh.v1 import stage_pb2
from stagemesh.wire.codec.messages import pack_int64, plan_from_pb, plan_to_pb
from stagemesh.wire.codec.tensors import tensor_from_pb, tensor_to_pb


@dataclass(frozen=True)
class StageStep:
    """One micro-batch as this stage runs it."""

    plan: StepPlan
    hidden: torch.Tensor | None = None
    """The previous stage's activations [N, H] as they came off the wire (CPU, the sender's
    dtype, read-only); None on the first stage, which embeds the plan's token ids. The runner
    moves them to its device and dtype on the step thread."""
    wire: stage_pb2.StageRequest | None = field(default=None, compare=False, repr=False)
    """The request as it came off the wire, kept only to be forwarded (``forward_step``)."""


def decode_step(request: stage_pb2.StageRequest, name: str, samples: bool = True) -> StageStep:
    """The step of ``request`` for stage ``name``, which ``samples`` when it is the last (the
    stages before it leave the rows' sampling parameters unread: ``plan_from_pb``);
    InvalidArgument when it is malformed."""
    try:
        hidden = tensor_from_pb(request.hidden) if request.HasField("hidden") else None
        return StageStep(plan_from_pb(request, specs=samples), hidden, request)
    except ValueError as err:
        raise InvalidArgument(f"stage {name}: malformed StageRequest {request.step_id}: {err}") from err


def encode_step(plan: StepPlan, hidden: torch.Tensor | None) -> stage_pb2.StageRequest:
    """The StageRequest that runs ``plan`` on ``hidden`` (both as this stage ran or produced them)."""
    return plan_to_pb(plan, None if hidden is None else tensor_to_pb(hidden))


def forward_step(step: StageStep, plan: StepPlan, out: torch.Tensor) -> stage_pb2.StageRequest:
    """What this stage sends the next one: ``plan`` (``step.plan``, or it with pending tokens
    filled in) on this stage's output ``out``.

    NOTE: the received request is passed on with ``out`` in place of its hidden states (and the
    filled-in token ids), not encoded again from the plan: re-encoding cost each stage of a
    chain ~0.45 ms a step at 128 decoding sequences, and its columns are the same."""
    if step.wire is None:
        return encode_step(plan, out)
    msg = step.wire
    if plan is not step.plan:
        msg.token_ids.CopyFrom(pack_int64(itertools.chain.from_iterable(c.token_ids for c in plan.chunks)))
    msg.hidden.CopyFrom(tensor_to_pb(out))
    return msg
