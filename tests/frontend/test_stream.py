"""A frontend's request streams: tokens gathered between messages, and the pacing of busy frontends."""

from __future__ import annotations

import asyncio
import time

import pytest

from frontend.stream import MIN_GAP_S, Pacer, RequestStream, Wake
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


def test_a_busy_frontend_wakes_writers_on_one_tick_and_never_holds_a_first_token_or_an_end():
    async def main():
        a, b, c = RequestStream(1, "a"), RequestStream(2, "b"), RequestStream(3, "c")
        pacer = Pacer(lambda: 100, messages_per_s=1000)  # a 100 ms gap
        a.sent = b.sent = 1  # a and b already sent a message; c did not
        pacer.wake({a, b, c})
        first = (a.wake.is_set(), b.wake.is_set(), c.wake.is_set())
        b.finish("stop")  # an end is never held
        after_end = (a.wake.is_set(), b.wake.is_set())
        t0 = time.monotonic()
        await a.wake.wait()
        pacer.close()
        return first, after_end, time.monotonic() - t0

    first, after_end, waited = asyncio.run(main())
    assert first == (False, False, True)
    assert after_end == (False, True)
    assert 0.05 < waited < 1.0  # a woke at the tick, ~100 ms later


def test_a_quiet_frontend_wakes_at_once():
    async def main():
        stream = RequestStream(1, "a")
        stream.sent = 3
        Pacer(lambda: 2).wake({stream})
        return stream.wake.is_set()

    assert asyncio.run(main())


def test_a_failure_ends_the_stream_once():
    async def main():
        stream = RequestStream(2, "r")
        stream.fail(Unavailable("gateway gone"))
        stream.fail(Unavailable("again"))
        stream.finish("stop")  # a late finish does not hide the error
        return stream

    stream = asyncio.run(main())
    assert stream.ended and stream.error.message == "gateway gone" and stream.finish_reason is None


def test_a_wake_lets_its_one_waiter_go_once_per_set_and_survives_a_cancelled_wait():
    async def main():
        wake = Wake()
        waiter = asyncio.create_task(wake.wait())
        await asyncio.sleep(0.01)
        blocked = not waiter.done()
        with pytest.raises(RuntimeError, match="one waiter"):
            await wake.wait()  # a second waiter is a bug, not a silent lost wake
        wake.set()
        await asyncio.wait_for(waiter, 1.0)
        await asyncio.wait_for(wake.wait(), 1.0)  # still set: returns at once
        wake.clear()
        gone = asyncio.create_task(wake.wait())
        await asyncio.sleep(0.01)
        gone.cancel()  # the client left mid-wait
        await asyncio.gather(gone, return_exceptions=True)
        wake.set()  # no waiter: nothing to wake, and no error
        after_cancel = wake.is_set()
        wake.clear()
        again = asyncio.create_task(wake.wait())
        await asyncio.sleep(0.01)
        still_blocked = not again.done()
        wake.set()
        await asyncio.wait_for(again, 1.0)
        return blocked, after_cancel, still_blocked

    assert asyncio.run(main()) == (True, True, True)
