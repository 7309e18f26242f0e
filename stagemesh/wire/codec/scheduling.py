"""protobuf <-> domain for ``Scheduling.Connect``, the stream between a frontend and the gateway.

Torch-free. A frontend names its requests on the stream by a ``handle`` (a number of its own),
so one token event is two int64 columns, packed like the stage's (``pack_int64``): an
``EventBatch`` of a step with 128 decoding requests is two 1 KiB byte strings, not 128
messages. Malformed messages raise ``ValueError`` naming the field.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from stagemesh.errors import StagemeshError
from stagemesh.serving.params import SamplingParams
from stagemesh.serving.types import TokenLogprobs
from stagemesh.v1 import scheduling_pb2
from stagemesh.wire.codec.messages import (
    error_from_pb,
    error_to_pb,
    logprobs_from_pb,
    logprobs_to_pb,
    pack_int64,
    sampling_from_pb,
    sampling_to_pb,
    unpack_int64,
)

__all__ = ["Submission", "Events", "submission_to_pb", "submission_from_pb", "events_to_pb", "events_from_pb"]


@dataclass(frozen=True)
class Submission:
    """One request a frontend hands to the gateway: tokenized, its seed drawn."""

    handle: int
    """The frontend's number for it on this stream; every event of it carries this number."""
    request_id: str
    """The client's id (or one the frontend made up): the journal's and ``Cancel``'s key."""
    prompt_token_ids: array
    """``array('q')`` of the prompt's token ids."""
    params: SamplingParams
    resume: bool = False
    """Take the request up if the gateway runs it (or ran it lately), else start it from
    ``known_token_ids``; either way its tokens come again from index 0 (``gateway.hub``)."""
    known_token_ids: array = field(default_factory=lambda: array("q"))
    """Tokens of it the frontend already has (a resume only)."""


def submission_to_pb(sub: Submission) -> scheduling_pb2.Submission:
    msg = scheduling_pb2.Submission(
        handle=sub.handle, request_id=sub.request_id, prompt_token_ids=pack_int64(sub.prompt_token_ids),
        params=sampling_to_pb(sub.params), resume=sub.resume,
    )
    if sub.known_token_ids:
        msg.known_token_ids.CopyFrom(pack_int64(sub.known_token_ids))
    return msg


def submission_from_pb(msg: scheduling_pb2.Submission) -> Submission:
    prompt = _ids(msg, "prompt_token_ids")
    known = _ids(msg, "known_token_ids") if msg.HasField("known_token_ids") else array("q")
    if known and not msg.resume:
        raise ValueError(f"Submission {msg.handle}: known_token_ids is for a resume only")
    return Submission(msg.handle, msg.request_id, prompt, sampling_from_pb(msg.params), msg.resume, known)


def _ids(msg: scheduling_pb2.Submission, name: str) -> array:
    try:
        return unpack_int64(getattr(msg, name))
    except ValueError as err:
        raise ValueError(f"Submission {msg.handle}: {name}: {err}") from None


@dataclass
class Events:
    """One message's worth of token events for one frontend (a builder on the gateway side)."""

    handles: array = field(default_factory=lambda: array("q"))
    """The request of each token, in order."""
    token_ids: array = field(default_factory=lambda: array("q"))
    finished: dict[int, str] = field(default_factory=dict)
    """handle -> finish_reason, for requests whose last event is in this batch."""
    errors: dict[int, StagemeshError] = field(default_factory=dict)
    """handle -> the error that ended it."""
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    """event index (into ``handles``) -> its token's log-probabilities, for requests that asked."""

    def __bool__(self) -> bool:
        return bool(self.handles or self.finished or self.errors)


def events_to_pb(events: Events) -> scheduling_pb2.EventBatch:
    return scheduling_pb2.EventBatch(
        handles=pack_int64(events.handles), token_ids=pack_int64(events.token_ids), finished=events.finished,
        errors=[scheduling_pb2.RequestError(handle=h, error=error_to_pb(e)) for h, e in events.errors.items()],
        logprobs={i: logprobs_to_pb(lp) for i, lp in events.logprobs.items()},
    )


def events_from_pb(msg: scheduling_pb2.EventBatch) -> Events:
    try:
        handles, token_ids = unpack_int64(msg.handles), unpack_int64(msg.token_ids)
    except ValueError as err:
        raise ValueError(f"EventBatch: {err}") from None
    if len(handles) != len(token_ids):
        raise ValueError(f"EventBatch: {len(handles)} handles but {len(token_ids)} token ids")
    errors = {e.handle: error_from_pb(e.error) for e in msg.errors}
    if msg.logprobs and max(msg.logprobs) >= len(handles):
        raise ValueError(f"EventBatch: logprobs for event {max(msg.logprobs)} of {len(handles)}")
    logprobs = {i: logprobs_from_pb(lp) for i, lp in msg.logprobs.items()}
    return Events(handles, token_ids, dict(msg.finished), errors, logprobs)
