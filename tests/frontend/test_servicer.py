"""The frontend's Generate loop against a stand-in link (its transport is tested in tests/integration)."""

from __future__ import annotations

import asyncio

from frontend.servicer import FrontendServicer
from frontend.stream import RequestStream
from stagemesh.config import ModelConfig
from stagemesh.v1 import gateway_pb2


class Link:
    """Hands out one stream; records what was submitted and cancelled."""

    def __init__(self):
        self.streams: dict[int, RequestStream] = {}
        self.cancelled: list[int] = []

    def submit(self, request_id, prompt, params, resume_from=None):
        stream = RequestStream(1, request_id, prompt, params, sent=resume_from or 0)
        self.streams[1] = stream
        return stream

    def cancel(self, stream):
        self.cancelled.append(stream.handle)


CONFIG = ModelConfig.from_dict({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64,
})


def request(n: int) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(request_id="r", token_ids=gateway_pb2.TokenIds(ids=[1, 2]), params={"max_new_tokens": n})


def test_tokens_and_the_finish_that_come_while_a_message_is_written_still_go_out():
    async def main():
        link = Link()
        servicer = FrontendServicer(link, None, CONFIG)
        gen = servicer.Generate(request(5), context=None)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        stream = link.streams[1]
        stream.tokens += [7, 8]
        stream.wake.set()
        msg1 = await first  # the generator is now suspended in its yield: the write
        stream.tokens += [9, 10, 11]
        stream.finish("length")
        rest = [m async for m in gen]
        return msg1, rest, link.cancelled

    msg1, rest, cancelled = asyncio.run(main())
    assert list(msg1.token_ids) == [7, 8] and msg1.index == 0 and msg1.finish_reason == ""
    assert [(list(m.token_ids), m.index, m.finish_reason) for m in rest] == [([9, 10, 11], 2, "length")]
    assert cancelled == []  # it ended: nothing to cancel


def test_a_client_that_leaves_cancels_its_request():
    async def main():
        link = Link()
        gen = FrontendServicer(link, None, CONFIG).Generate(request(50), context=None)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        link.streams[1].tokens.append(3)
        link.streams[1].wake.set()
        await first
        await gen.aclose()
        return link.cancelled

    assert asyncio.run(main()) == [1]


def test_a_resumed_stream_starts_at_the_clients_index_and_a_new_one_gets_a_seed():
    async def main():
        link = Link()
        servicer = FrontendServicer(link, None, CONFIG)
        resumed = request(6)
        resumed.resume_from = 3
        gen = servicer.Generate(resumed, context=None)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        stream = link.streams[1]
        stream.tokens += [4, 5]  # the gateway re-sends from index 0: the client has these
        stream.wake.set()
        await asyncio.sleep(0.01)
        assert not first.done()
        stream.tokens += [6, 7]
        stream.wake.set()
        msg = await first
        stream.finish("length")
        rest = [m async for m in gen]
        return msg, rest, stream.params

    msg, rest, params = asyncio.run(main())
    assert (list(msg.token_ids), msg.index) == ([7], 3)
    assert [(list(m.token_ids), m.index, m.finish_reason) for m in rest] == [([], 4, "length")]
    assert params.seed is not None  # drawn by the frontend: a resubmission samples the same tokens
