"""The SDK hands out the log-probabilities a ``GenerateResponse`` carries: per streamed token,
and per token of the assembled result; None where the call did not ask."""

from __future__ import annotations

from stagemesh.client._common import assemble, tokens_of
from stagemesh.serving.types import TokenLogprobs
from stagemesh.wire.codec.messages import GenerateChunk, chunk_to_pb

ONE = TokenLogprobs(-0.5, ((7, -0.5), (3, -1.5)))
TWO = TokenLogprobs(-2.0, ((1, -0.25), (8, -2.0)))


def test_each_streamed_token_carries_its_own_and_the_result_all_of_them():
    first = tokens_of(chunk_to_pb(GenerateChunk("r", (7, 8), 0, "ab", None, (ONE, TWO))))
    # a token generated before a gateway restart: not known
    last = tokens_of(chunk_to_pb(GenerateChunk("r", (9,), 2, "c", "length", (None,))))
    assert [t.logprobs for t in first + last] == [ONE, TWO, TokenLogprobs(None)]
    result = assemble(first + last, "r")
    assert result.token_ids == (7, 8, 9) and result.logprobs == (ONE, TWO, TokenLogprobs(None))


def test_without_logprobs_nothing_is_there():
    items = tokens_of(chunk_to_pb(GenerateChunk("r", (7, 8), 0, "ab", "stop")))
    assert [t.logprobs for t in items] == [None, None]
    assert assemble(items, "r").logprobs is None
