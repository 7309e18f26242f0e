"""A frontend's request streams: tokens gathered between messages, and the pacing of busy frontends."""

from __future__ import annotations

import asyncio
import time

from frontend.stream import MIN_GAP_S, Pacer, RequestStream
from stagemesh.errors import Unavailable


def test_a_few_streams_are_never_held_back_and_many_share_the_budget():
    open_streams = [1]
    pacer = Pacer(lambda: open_streams[0], messages_per_s=4000, max_gap_s=0.05)
    assert pacer.gap() == 0.0  # 1 / 4000 s is below MIN_GAP_S: not worth a timer
    open_streams[0] = 128
    assert pacer.gap() == 128 / 4000  # each stream one message every 32 ms
    open_streams[0] = 10_000
    assert pacer.gap() == 0.05
    assert Pacer(lambda: 10_000, messages_per_s=0).gap() == 0.0  # pacing off
    assert 4000 * MIN_GAP_S > 1


def test_tokens_that_came_while_the_writer_waited_go_out_together_and_the_end_cuts_the_wait_short():
    async def main():
        stream = RequestStream(1, "r")
        stream.tokens += [5, 6]
        stream.wake.set()
        first = await stream.next_tokens()
        t0 = time.monotonic()
        pacing = asyncio.ensure_future(stream.pace(5.0, t0))
        stream.tokens += [7, 8, 9]
        stream.wake.set()
        await asyncio.sleep(0.01)
        assert not pacing.done()  # held back: tokens gather
        stream.finish("length")
        await pacing
        waited = time.monotonic() - t0
        return first, await stream.next_tokens(), stream.finish_reason, waited

    first, second, reason, waited = asyncio.run(main())
    assert first == (0, [5, 6]) and second == (2, [7, 8, 9]) and reason == "length"
    assert waited < 1.0  # the finish ended the 5 s wait


def test_a_failure_ends_the_stream_once():
    async def main():
        stream = RequestStream(2, "r")
        stream.fail(Unavailable("gateway gone"))
        stream.fail(Unavailable("again"))
        stream.finish("stop")  # a late finish does not hide the error
        return stream

    stream = asyncio.run(main())
    assert stream.ended and stream.error.message == "gateway gone" and stream.finish_reason is None
