"""The step path's fast constructors give what the dataclasses' own ``__init__`` gives."""

from __future__ import annotations

import dataclasses

import pytest

from stagemesh.serving.types import SampleSpec, SeqChunk, TokenEvent, TokenLogprobs, seq_chunk, token_event


@pytest.mark.parametrize("sample", [None, SampleSpec(seed=3, index=1, temperature=0.5)])
def test_seq_chunk_is_the_dataclass_with_every_field(sample):
    fast, slow = seq_chunk(4, 9, (1, 2), sample), SeqChunk(4, 9, (1, 2), sample)
    assert fast == slow and hash(fast) == hash(slow) and fast.end == 11
    assert vars(fast) == vars(slow)  # a field added to SeqChunk but not to seq_chunk fails here
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.start = 0


def test_token_event_is_the_dataclass_with_every_field():
    lp = TokenLogprobs(-0.5, ((7, -0.5),))
    assert token_event("r", 7, 3, "stop", lp) == TokenEvent("r", 7, 3, "stop", lp)
    assert vars(token_event("r", 7, 3)) == vars(TokenEvent("r", 7, 3))  # every field, defaults too
