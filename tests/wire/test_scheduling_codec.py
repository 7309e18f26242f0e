"""Round trips of the frontend <-> gateway stream's messages (``stagemesh.wire.codec.scheduling``)."""

from __future__ import annotations

from array import array

import pytest

from stagemesh.errors import Cancelled, Unavailable
from stagemesh.serving.params import SamplingParams
from stagemesh.serving.types import TokenLogprobs
from stagemesh.v1 import scheduling_pb2, tensor_pb2
from stagemesh.wire.codec.scheduling import (
    Events,
    Submission,
    events_from_pb,
    events_to_pb,
    submission_from_pb,
    submission_to_pb,
)


def test_a_submission_round_trips_with_its_parameters():
    sub = Submission(7, "req-1", array("q", [1, 2, 99_999]),
                     SamplingParams(max_new_tokens=5, temperature=0.5, seed=3, logprobs=True, top_logprobs=2))
    back = submission_from_pb(scheduling_pb2.Submission.FromString(submission_to_pb(sub).SerializeToString()))
    assert back == sub
    resume = Submission(8, "req-2", array("q", [4]), SamplingParams(seed=1), resume=True, known_token_ids=array("q", [5, 6]))
    assert submission_from_pb(scheduling_pb2.Submission.FromString(submission_to_pb(resume).SerializeToString())) == resume


def test_an_event_batch_round_trips_as_columns():
    events = Events(array("q", [1, 2, 1]), array("q", [10, 20, 11]), {1: "length"}, {3: Cancelled("gone")})
    msg = events_to_pb(events)
    assert len(msg.handles.data) == 24 and len(msg.token_ids.data) == 24  # two int64 columns, nothing per token
    back = events_from_pb(scheduling_pb2.EventBatch.FromString(msg.SerializeToString()))
    assert (back.handles, back.token_ids, back.finished) == (events.handles, events.token_ids, {1: "length"})
    assert isinstance(back.errors[3], Cancelled) and back.errors[3].message == "gone"
    assert not Events() and Events(errors={1: Unavailable("x")})


def test_logprobs_ride_along_only_for_the_events_that_have_them():
    lp = TokenLogprobs(-0.5, ((11, -0.5), (12, -2.0)))
    events = Events(array("q", [1, 2, 1]), array("q", [10, 20, 11]), logprobs={2: lp})
    back = events_from_pb(scheduling_pb2.EventBatch.FromString(events_to_pb(events).SerializeToString()))
    assert back.logprobs == {2: lp}
    past = events_to_pb(events)
    past.logprobs[3].logprob = -1.0
    with pytest.raises(ValueError, match="logprobs for event 3 of 3"):
        events_from_pb(past)


def test_malformed_columns_are_refused_naming_the_field():
    bad = scheduling_pb2.Submission(handle=4, prompt_token_ids=tensor_pb2.Tensor(data=b"\0" * 7, dtype="int64", shape=[1]))
    with pytest.raises(ValueError, match="Submission 4: prompt_token_ids"):
        submission_from_pb(bad)
    one = tensor_pb2.Tensor(data=b"\0" * 8, dtype="int64", shape=[1])
    known = scheduling_pb2.Submission(handle=5, prompt_token_ids=one, known_token_ids=one)
    with pytest.raises(ValueError, match="Submission 5: known_token_ids is for a resume only"):
        submission_from_pb(known)
    uneven = events_to_pb(Events(array("q", [1, 2]), array("q", [5, 6])))
    uneven.token_ids.CopyFrom(events_to_pb(Events(array("q", [1]), array("q", [5]))).token_ids)
    with pytest.raises(ValueError, match="2 handles but 1 token ids"):
        events_from_pb(uneven)
